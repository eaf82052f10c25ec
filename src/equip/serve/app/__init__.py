"""The photo web app (`python -m equip.app`): a page and a JSON API on a registered model.

`models` loads the model and says what it is (name, version, run, where to see the run), and
swaps in a new champion when the registry crowns one; `api` is the FastAPI app (the page,
`POST /predict`, `GET /health`, `GET /model`, `POST /reload`); `command` is the command line.
"""

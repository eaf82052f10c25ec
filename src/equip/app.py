"""`python -m equip.app [model=URI] [port=N] [host=H]`: the photo page on a model; the work is in
equip.serve.app."""

from equip.serve.app.command import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())

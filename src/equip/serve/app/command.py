"""A web page on a model: drop or pick photos, see each one's top-3 classes.

    python -m equip.app [model=models:/equip-gear@champion] [port=8000] [host=127.0.0.1]

Then open http://127.0.0.1:8000. `model` is a registered model (models:/NAME/VERSION, or
models:/NAME@champion: the version equip tagged champion, the default for `equip-gear`), a run
(runs:/ID/model or the run id). A champion is looked up again every `reload_s` seconds (0: only
on POST /reload) and a new one is served without a restart; other models are fixed. Options are
key=value pairs: model, port (0: any free port), host, reload_s, tracking_uri (default:
MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder). The JSON API beside the page:
POST /predict, GET /model, GET /health, POST /reload (docs/registry-and-serving.md#the-app).
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from equip.errors import EquipError
from equip.serve._options import typed_options
from equip.terminal import fail, fail_if_refused, printed_help, say


@dataclass
class AppOptions:
    # The registry's defaults (conf/registry/default.yaml: name equip-gear, alias champion).
    model: str = "models:/equip-gear@champion"
    port: int = 8000
    host: str = "127.0.0.1"
    reload_s: float = 30.0
    tracking_uri: str | None = None


DEFAULTS = OmegaConf.structured(AppOptions)


def options(args: list[str]) -> DictConfig:
    """key=value pairs, typed and checked: an unknown key or a wrong type is one line."""
    return typed_options(DEFAULTS, args, "equip.app")


def main(argv: list[str] | None = None) -> int:
    """Serve until Ctrl-C: 0; 2 with one line when the model or the port is not there."""
    args = sys.argv[1:] if argv is None else argv
    if printed_help(args, __doc__, without_args=False):  # no argument: the champion
        return 0
    try:
        cfg = options(args)
        server, holder = _start(cfg)
    except EquipError as e:
        fail(str(e), 2)
    except Exception as e:
        fail_if_refused(e)
        raise
    # The libraries and the model live as long as the server: out of the collector's sight, its
    # full collections no longer walk their ~700k objects (a pause in some request) and the
    # process exits in 1 s after Ctrl-C, not 6 (measured on 2 busy cores).
    gc.freeze()
    served = holder.current
    say(
        f"equip app: {server.url}  model {served.location} (run {served.run_id or '?'}); "
        + (f"follows the champion, checked every {cfg.reload_s:g} s; " if cfg.reload_s else "")
        + "Ctrl-C stops it"
    )
    holder.poll(cfg.reload_s)
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down; it may raise it again after
        pass
    finally:
        holder.stop()
    return 0


def _start(cfg: DictConfig):
    """The store opened, the model loaded, the port bound: everything that can fail on the
    user's input, before serving."""
    from equip.serve.app.api import create_app
    from equip.serve.app.models import ModelHolder
    from equip.serve.app.server import AppServer, bind
    from equip.track.store import open_given

    first = "train and register a model first (python train.py registry.enabled=true)"
    open_given(cfg.tracking_uri, "tracking_uri", first)
    sock = bind(cfg.host, cfg.port)  # first: a taken port is said before seconds of loading
    try:
        holder = ModelHolder(str(cfg.model))
    except BaseException:
        sock.close()
        raise
    return AppServer(create_app(holder), sock), holder

"""The board's HTTP routes (FastAPI): one static page and a small JSON API over runs.py.

  GET  /                   the page (static/index.html; uPlot draws the curves)
  GET  /api/runs           the runs list: name, path, stage, model, status, step, headline, alarms, last metrics
  GET  /api/metrics?run=   every metrics.jsonl record of one run
  GET  /api/rollouts?run=&step=   one step of rollouts.jsonl (default: the latest) and the steps there are
  GET  /api/config?run=&run=      the runs' configs and the keys where they differ
  GET  /api/samples?run=   an SFT run's first rows rendered with the trained spans marked
  POST /api/chat           {"run", "base"?, "messages", "max_new_tokens"?}: a reply from the run's model
  GET|POST /api/launch     whether launching is on / {"stage", "name", "config"}: start a run (launch.py)

Read-only unless started with allow_launch: then only /api/launch writes, a new run folder and its
config and log under RUNS_DIR/.launch. With an api key every route needs it, as a Bearer header,
a `key` query parameter (the page's first load sets a cookie from it) or that cookie.
"""

from __future__ import annotations

import hmac
import sys
from pathlib import Path

from posttrain.board.runs import Runs, UnknownRun

STATIC = Path(__file__).parent / "static"
COOKIE = "posttrain_board_key"


def create_app(runs_dir: str | Path, api_key: str | None = None, chat_models: int = 2, allow_launch: bool = False):
    from fastapi import Body, FastAPI, HTTPException, Query, Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    from posttrain.board.chat_models import ChatModels
    from posttrain.board.launch import STAGES, Launcher
    from posttrain.errors import ConfigError

    runs = Runs(runs_dir)
    chats = ChatModels(runs, capacity=chat_models)
    launcher = Launcher(runs.root) if allow_launch else None
    app = FastAPI(title="posttrain board", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if api_key is None:
            return await call_next(request)
        header = request.headers.get("authorization", "")
        given = [header[7:] if header.lower().startswith("bearer ") else "", request.query_params.get("key", ""),
                 request.cookies.get(COOKIE, "")]
        if not any(g and hmac.compare_digest(g.encode(), api_key.encode()) for g in given):
            return JSONResponse({"error": "this board needs its api key: open it as /?key=KEY or send "
                                          "'Authorization: Bearer KEY'"}, status_code=401)
        response = await call_next(request)
        if request.query_params.get("key"):
            response.set_cookie(COOKIE, api_key, httponly=True, samesite="strict")
        return response

    def folder(rid: str) -> Path:
        try:
            return runs.folder(rid)
        except UnknownRun:
            raise HTTPException(404, f"no run {rid!r} under {runs.root}") from None

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/runs")
    def list_runs():
        if launcher:
            launcher.reap()
        return {"root": str(runs.root), "runs": runs.all()}

    @app.get("/api/metrics")
    def metrics(run: str):
        return {"run": run, "records": runs.metrics(folder(run))}

    @app.get("/api/rollouts")
    def rollouts(run: str, step: int | None = None):
        return {"run": run, **runs.rollout_step(folder(run), step)}

    @app.get("/api/config")
    def config(run: list[str] = Query(...)):
        return runs.config_diff({rid: folder(rid) for rid in run})

    @app.get("/api/samples")
    def samples(run: str, count: int = Query(3, ge=1, le=20)):
        from posttrain.board.samples import preview_samples

        return {"run": run, "samples": preview_samples(folder(run), count)}

    @app.post("/api/chat")
    def chat(run: str = Body(...), messages: list[dict] = Body(...), base: bool = Body(False),
             max_new_tokens: int = Body(64, ge=1, le=1024)):
        return {"run": run, "base": base, "text": chats.reply(folder(run), base, messages, max_new_tokens)}

    @app.get("/api/launch")
    def launch_info():
        return {"allowed": launcher is not None, "stages": list(STAGES)}

    @app.post("/api/launch")
    def launch(stage: str = Body(...), name: str = Body(...), config: str = Body(...)):
        if launcher is None:
            raise HTTPException(403, "launching runs is off: start the board with --allow-launch")
        try:
            return launcher.launch(stage, name, config)
        except ConfigError as err:
            raise HTTPException(400, str(err)) from None

    return app


def run_board(runs_dir: str, host: str = "127.0.0.1", port: int = 8001, api_key: str | None = None,
              allow_launch: bool = False) -> None:
    import importlib.util
    import socket

    from posttrain.errors import ConfigError

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"the board needs {' and '.join(missing)}: pip install 'posttrain[board]'")
    if not Path(runs_dir).expanduser().is_dir():
        raise ConfigError(f"RUNS_DIR {runs_dir!r} is not a folder; give the folder your runs write into "
                          "(their output_dir's parent), e.g. `posttrain board runs`")
    try:  # a clear line now rather than uvicorn's log after start-up
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({err.strerror}); choose another "
                          "--port") from None
    import uvicorn

    local = host in ("127.0.0.1", "localhost", "::1")
    if allow_launch and not local and not api_key:
        raise ConfigError(f"--allow-launch on --host {host} lets anyone who reaches the port run code here: "
                          "add --api-key KEY, or serve on 127.0.0.1")
    if not local and not api_key:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this port sees your runs and "
              "can chat with their models", file=sys.stderr)
    print(f"posttrain board over {Path(runs_dir).expanduser().resolve()} at http://{host}:{port}/"
          + ("?key=KEY" if api_key else ""), flush=True)
    uvicorn.run(create_app(runs_dir, api_key, allow_launch=allow_launch), host=host, port=port, log_level="warning")

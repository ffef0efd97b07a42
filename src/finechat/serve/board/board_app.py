"""The board's HTTP routes: the page, and a JSON API for the Data, Train, Evaluate, Chat and Export tabs.

Every route sits behind the server's own guards (:class:`~finechat.serve.guards.RequestGuard`: Host names,
JSON-only bodies, the page's security headers; :class:`~finechat.serve.api.BodyLimit`), and every ``/api``
route and every chat request checks the API key when one is set. Client errors are 4xx in OpenAI's error
shape naming the field (``param``); the page shows the message beside that field.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoint's ``request: Request`` annotation.

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from finechat.errors import FinechatError
from finechat.serve.api import PAGE_HEADERS, BodyLimit, _endpoint, add_error_handlers
from finechat.serve.board import data_view, forms
from finechat.serve.board.chat_server import FRAME_CSP, ChatServer
from finechat.serve.board.jobs import TRAIN_YAML, Jobs
from finechat.serve.board.workspace import EVALS_DIR, EXPORTS_DIR, Workspace, folder_size
from finechat.serve.guards import HostNames, RequestGuard, api_key_problem
from finechat.serve.schemas import ApiError
from finechat.train.estimate import estimate_without_weights
from finechat.train.train_config import TrainConfig

STATIC_DIR = Path(__file__).parent / "static"
BOARD_HEADERS = {**PAGE_HEADERS, "Content-Security-Policy": FRAME_CSP}
GGUF_TYPES = ("f16", "bf16", "f32", "q8_0", "q4_0", "q4_1")


@dataclasses.dataclass
class BoardSettings:
    """Access rules and limits of the board's server."""

    api_key: str | None = None
    allowed_hosts: list[str] = dataclasses.field(default_factory=list)
    max_body_bytes: int = 64_000_000
    max_running: int = 1
    recipes: str | None = None


def create_board_app(workspace: str | Path, settings: BoardSettings | None = None) -> Any:
    """A FastAPI app for the board on ``workspace`` (created if absent); the job scheduler runs while it serves."""
    from fastapi import FastAPI
    from starlette.staticfiles import StaticFiles

    settings = settings or BoardSettings()
    ws = Workspace(workspace)
    board = Board(ws, settings)
    app = FastAPI(title="finechat board", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.board = board
    app.router.add_event_handler("startup", board.jobs.start_scheduler)
    app.router.add_event_handler("shutdown", board.close)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestGuard, hosts=HostNames(settings.allowed_hosts), headers=BOARD_HEADERS)
    add_error_handlers(app)
    for method, path, handler in board.table():
        app.add_api_route(path, _endpoint(handler), methods=[method], name=handler.__name__)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def mount_board(app: Any, workspace: str | Path, settings: BoardSettings, prefix: str = "/board") -> Any:
    """Serve the board under ``prefix`` of ``app`` (``finechat serve --board``); returns the board's own app.

    The board keeps its own guards (Host names, JSON bodies, its API key, its body limit) inside ``app``'s
    (which see every request first); a mounted app gets no startup / shutdown events, so ``app`` runs the
    board's job scheduler and closes it. The chat page lists the board in ``app.state.page_links``.
    """
    board_app = create_board_app(workspace, settings)
    board = board_app.state.board
    app.mount(prefix, board_app, name="board")
    app.router.add_event_handler("startup", board.jobs.start_scheduler)
    app.router.add_event_handler("shutdown", board.close)
    app.state.page_links = [*getattr(app.state, "page_links", []), ("Board", prefix.strip("/") + "/")]
    return board_app


class Board:
    """The route handlers, over one workspace, its jobs and its chat server."""

    def __init__(self, ws: Workspace, settings: BoardSettings):
        self.ws, self.settings = ws, settings
        self.jobs = Jobs(ws, max_running=settings.max_running)
        self.chat = ChatServer(ws)
        self.tokenizers = data_view.Tokenizers()
        self.recipes = Path(settings.recipes) if settings.recipes else forms.default_recipes_folder()
        if self.recipes is not None:  # the recipes name data/samples/...: give the workspace its own copy
            ws.add_samples(self.recipes.parent / "data" / "samples")
        tasks = forms.shipped_tasks_folder()
        if tasks is not None:  # the shipped lm-eval tasks, as data/tasks/finechat_mc/finechat_mc_en.yaml
            ws.add_samples(tasks, "tasks")

    def table(self) -> list[tuple[str, str, Any]]:
        return [("GET", "/", self.page), ("GET", "/health", self.health), ("GET", "/api/info", self.info),
                ("GET", "/api/files", self.files), ("POST", "/api/upload", self.upload),
                ("POST", "/api/data/analyse", self.analyse), ("GET", "/api/train/schema", self.schema),
                ("POST", "/api/train/plan", self.plan), ("POST", "/api/train/estimate", self.estimate),
                ("POST", "/api/train/start", self.start_train), ("GET", "/api/jobs", self.list_jobs),
                ("GET", "/api/job", self.job), ("POST", "/api/jobs/stop", self.stop_job),
                ("POST", "/api/jobs/resume", self.resume_job), ("GET", "/api/checkpoints", self.checkpoints),
                ("POST", "/api/eval/start", self.start_eval), ("POST", "/api/export/start", self.start_export),
                ("POST", "/api/chat/start", self.chat_start), ("POST", "/api/chat/stop", self.chat_stop),
                ("GET", "/api/chat/status", self.chat_status),
                ("GET", "/chat/{path:path}", self.chat_forward), ("POST", "/chat/{path:path}", self.chat_forward)]

    async def close(self) -> None:
        self.jobs.stop_scheduler()
        await self.chat.close()

    # -- page and workspace ----------------------------------------------------------------------------
    async def page(self, request: Any) -> Any:
        from fastapi.responses import FileResponse

        return FileResponse(STATIC_DIR / "index.html", headers=BOARD_HEADERS)

    async def health(self, request: Any) -> dict:
        return {"status": "ok"}

    async def info(self, request: Any) -> dict:
        self._check_key(request)
        return {"workspace": str(self.ws.root), "models": self.ws.list_models(),
                "recipes": forms.list_recipes(self.recipes), "datasets": data_view.dataset_names(),
                "formats": ["auto", *data_view.FORMATS, *data_view.PREFERENCE_FORMATS], "gguf_types": GGUF_TYPES}

    async def files(self, request: Any) -> dict:
        self._check_key(request)
        return {"files": self.ws.list_files()}

    async def upload(self, request: Any) -> dict:
        body = await self._body(request)
        content = _text(body, "content", required=True)
        path = self.ws.save_upload(_text(body, "name", required=True), content, bool(body.get("replace")))
        return {"path": self.ws.relative(path), "bytes": path.stat().st_size}

    async def analyse(self, request: Any) -> dict:
        body = await self._body(request)
        shown = _text(body, "path", required=True)
        path = self.ws.resolve(shown, "path", must_exist=True)
        if not path.is_file():
            raise ApiError(422, f"path: {shown} is a folder; pick a data file", param="path", code="invalid_value")
        model = _text(body, "model") or "default"
        model_path = model if model == "default" else str(self.ws.resolve(model, "model", must_exist=True))
        return await asyncio.to_thread(
            data_view.analyse, path, shown, model_path, model, _text(body, "template") or "auto",
            _text(body, "format") or "auto", _text(body, "dataset") or None, self.tokenizers)

    # -- training ---------------------------------------------------------------------------------------
    async def schema(self, request: Any) -> dict:
        self._check_key(request)
        return forms.form_schema()

    async def plan(self, request: Any) -> dict:
        body = await self._body(request)
        plan = forms.build_run(body.get("config"), self.ws)
        yaml_path = f"{self.ws.relative(plan.output_dir)}/{TRAIN_YAML}"
        return {"yaml": plan.yaml_text, "command": plan.command(yaml_path), "yaml_path": yaml_path,
                "workspace": str(self.ws.root)}

    async def estimate(self, request: Any) -> dict:
        body = await self._body(request)
        plan = forms.build_run(body.get("config"), self.ws)
        cfg = self._absolute_model(plan.config)
        try:
            est = await asyncio.to_thread(estimate_without_weights, cfg)
        except FinechatError as e:
            raise ApiError(422, f"model: {e}", param="model", code="invalid_value") from None
        except Exception as e:  # noqa: BLE001  a folder that is no model: the input's fault, not a 500
            raise ApiError(422, f"model: cannot estimate this model: {type(e).__name__}: {e}", param="model",
                           code="invalid_value") from None
        return {"table": est.table(), **{k: v for k, v in dataclasses.asdict(est).items()
                                         if isinstance(v, (int, float, bool, str)) or v is None}}

    async def start_train(self, request: Any) -> dict:
        body = await self._body(request)
        plan = forms.build_run(body.get("config"), self.ws)
        yaml_path = f"{self.ws.relative(plan.output_dir)}/{TRAIN_YAML}"
        title = str(body.get("title") or plan.output_dir.name)
        extra = {"model": plan.config.model, "method": plan.config.method, "stage": plan.config.stage,
                 "max_steps": plan.config.max_steps}
        return self.jobs.create("train", plan.output_dir, plan.argv_for(yaml_path), title, "output_dir", extra,
                                files={TRAIN_YAML: plan.yaml_text})

    def _absolute_model(self, cfg: TrainConfig) -> TrainConfig:
        if cfg.model == "default":
            return cfg
        return dataclasses.replace(cfg, model=str(self.ws.resolve(cfg.model, "model", must_exist=True)))

    # -- jobs -------------------------------------------------------------------------------------------
    async def list_jobs(self, request: Any) -> dict:
        self._check_key(request)
        return {"jobs": self.jobs.list(), "now": time.time()}

    async def job(self, request: Any) -> dict:
        self._check_key(request)
        job_id = request.query_params.get("id") or ""
        detail = self.jobs.detail(job_id) if job_id else None
        if detail is None:
            raise ApiError(422, "id: give the job's folder, e.g. runs/lora-1", param="id", code="invalid_value")
        if detail["kind"] == "export" and detail["state"] == "finished":
            out = self.ws.resolve(detail["extra"]["out"], "out")
            if out.exists():
                detail["result"] = {"path": str(out), "bytes": folder_size(out)}
                modelfile = out.with_suffix(".Modelfile")
                if modelfile.is_file():
                    detail["result"]["modelfile"] = str(modelfile)
        if detail["kind"] == "eval" and detail["state"] == "finished":
            detail["report"] = _eval_report(self.ws.resolve(detail["id"], "id") / "result")
        return detail

    async def stop_job(self, request: Any) -> dict:
        body = await self._body(request)
        return await asyncio.to_thread(self.jobs.stop, _text(body, "run", required=True))

    async def resume_job(self, request: Any) -> dict:
        body = await self._body(request)
        return self.jobs.resume(_text(body, "run", required=True))

    async def checkpoints(self, request: Any) -> dict:
        """Every checkpoint of every run, with the run's base model (an adapter needs it)."""
        self._check_key(request)
        out = []
        for job in self.jobs.list():
            if job["kind"] != "train":
                continue
            folder = self.ws.resolve(job["id"], "run")
            for ckpt in self.jobs.detail(job["id"]).get("checkpoints", []):
                out.append({"run": job["id"], "path": ckpt, "model": job["extra"].get("model", "default"),
                            "adapter": (self.ws.root / ckpt / "adapter_config.json").is_file(),
                            "state": job["state"], "folder": str(folder)})
        return {"checkpoints": out}

    async def start_eval(self, request: Any) -> dict:
        body = await self._body(request)
        name = self.ws.check_name(_text(body, "name", required=True), "name")
        folder = self.ws.resolve(f"{EVALS_DIR}/{name}", "name")
        model = self._model(body)
        adapters = body.get("adapters") or []
        if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
            raise ApiError(422, "adapters: expected a list of checkpoint folders", param="adapters",
                           code="invalid_value")
        for a in adapters:
            self.ws.resolve(a, "adapters", must_exist=True)
        argv = ["eval", "--model", model, "--output-dir", f"{EVALS_DIR}/{name}/result"]
        tasks = _text(body, "tasks")
        if tasks:
            for task in tasks.split(","):
                if "/" in task or task.endswith((".yaml", ".yml")):
                    self.ws.resolve(task.strip(), "tasks", must_exist=True)
            argv += ["--tasks", tasks, *_number_flag(body, "limit", float, 0, 10**6)]
        else:
            data = _text(body, "data", required=True)
            self.ws.resolve(data, "data", must_exist=True)
            argv += ["--data", data, *_number_flag(body, "max_samples", int, 1, 10**6),
                     *_number_flag(body, "max_new_tokens", int, 1, 4096)]
        if body.get("base", True) or len(adapters) != 1:
            entries = (["base"] if body.get("base", True) else []) + adapters
            if not entries:
                raise ApiError(422, "adapters: pick at least one checkpoint, or the base model", param="adapters",
                               code="invalid_value")
            argv += ["--compare", *entries]
        else:
            argv += ["--adapter", adapters[0]]
        return self.jobs.create("eval", folder, argv, name, "name", {"model": model, "adapters": adapters})

    async def start_export(self, request: Any) -> dict:
        body = await self._body(request)
        name = self.ws.check_name(_text(body, "name", required=True), "name")
        folder = self.ws.resolve(f"{EXPORTS_DIR}/{name}", "name")
        model, adapter = self._model(body), _text(body, "adapter")
        if adapter:
            self.ws.resolve(adapter, "adapter", must_exist=True)
        to = _text(body, "to") or "hf"
        argv = ["export", "--model", model] + (["--adapter", adapter] if adapter else [])
        if to == "gguf":
            outtype = _text(body, "outtype") or "f16"
            if outtype not in GGUF_TYPES:
                raise ApiError(422, f"outtype: {outtype!r} is not one of {', '.join(GGUF_TYPES)}", param="outtype",
                               code="invalid_value")
            out = f"{EXPORTS_DIR}/{name}/model.gguf"
            argv += ["--to", "gguf", "--outtype", outtype, "--out", out]
        elif to == "hf":
            out = f"{EXPORTS_DIR}/{name}/model"
            bits = body.get("quantization_bit")
            if bits not in (None, "", 8, 4, "8", "4"):
                raise ApiError(422, f"quantization_bit: {bits!r} is not 8 or 4 (or empty)", param="quantization_bit",
                               code="invalid_value")
            argv += ["--out", out] + (["--quantization-bit", str(bits)] if bits not in (None, "") else [])
        else:
            raise ApiError(422, f"to: {to!r} is not hf or gguf", param="to", code="invalid_value")
        return self.jobs.create("export", folder, argv, name, "name", {"model": model, "adapter": adapter,
                                                                        "to": to, "out": out})

    def _model(self, body: dict) -> str:
        model = _text(body, "model") or "default"
        if model != "default":
            self.ws.resolve(model, "model", must_exist=True)
        return model

    # -- chat -------------------------------------------------------------------------------------------
    async def chat_start(self, request: Any) -> dict:
        body = await self._body(request)
        model, adapter = self._model(body), _text(body, "adapter")
        if adapter:
            self.ws.resolve(adapter, "adapter", must_exist=True)
        knowledge = _text(body, "knowledge")
        if knowledge:
            self.ws.resolve(knowledge, "knowledge", must_exist=True)
        tools = _text(body, "tools")
        if tools and not all(t.strip().isidentifier() or t.strip() == "all" for t in tools.split(",")):
            raise ApiError(422, "tools: give tool names (calculator, solver, search, all), comma-separated",
                           param="tools", code="invalid_value")
        return await asyncio.to_thread(self.chat.start, model, adapter, tools, knowledge, bool(body.get("medical")))

    async def chat_stop(self, request: Any) -> dict:
        await self._body(request)
        await asyncio.to_thread(self.chat.stop)
        return self.chat.status()

    async def chat_status(self, request: Any) -> dict:
        self._check_key(request)
        return await asyncio.to_thread(self.chat.status)

    async def chat_forward(self, request: Any) -> Any:
        path = request.path_params["path"]
        if request.method != "GET" or path.startswith("v1/"):
            self._check_key(request)
        return await self.chat.forward(request, path)

    # -- checks -----------------------------------------------------------------------------------------
    def _check_key(self, request: Any) -> None:
        problem = api_key_problem(request.headers.get("authorization", ""), self.settings.api_key)
        if problem == "missing":
            raise ApiError(401, "api_key: this board needs its API key (Settings: API key)", param="api_key",
                           code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        if problem == "invalid":
            raise ApiError(401, "api_key: incorrect API key", param="api_key", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Any) -> dict:
        self._check_key(request)
        raw = await request.body()
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(422, "the body must be a JSON object", code="invalid_value")
        return body


def _eval_report(folder: Path) -> str:
    """The table an evaluation wrote (side by side, lm-eval's, or one model's metrics)."""
    for name in ("compare.md", "lm_eval_compare.md"):
        if (folder / name).is_file():
            return (folder / name).read_text(encoding="utf-8")
    for name in ("metrics.json", "lm_eval_results.json"):
        if (folder / name).is_file():
            return (folder / name).read_text(encoding="utf-8")[:20_000]
    return ""


def _text(body: dict, key: str, required: bool = False) -> str | None:
    value = body.get(key)
    if value in (None, ""):
        if required:
            raise ApiError(422, f"{key}: a value is required", param=key, code="missing_field")
        return None
    if not isinstance(value, str):
        raise ApiError(422, f"{key}: expected text, got {type(value).__name__}", param=key, code="invalid_value")
    return value.strip()


def _number_flag(body: dict, key: str, kind: type, lo: float, hi: float) -> list[str]:
    value = body.get(key)
    if value in (None, ""):
        return []
    try:
        number = kind(value)
        if isinstance(value, bool) or (kind is int and float(value) != number):
            raise ValueError
    except (TypeError, ValueError):
        raise ApiError(422, f"{key}: expected a{'n integer' if kind is int else ' number'}, got {value!r}",
                       param=key, code="invalid_value") from None
    if not lo <= number <= hi:
        raise ApiError(422, f"{key}: {number} is out of range ({lo}..{hi})", param=key, code="invalid_value")
    return ["--" + key.replace("_", "-"), str(number)]

"""Reward sources, and several of them summed with weights.

Every source scores a batch of completions and returns one float per completion:

  reward_model: FOLDER     a reward model written by `posttrain rm`: the prompt + completion rendered
                           with its chat template and scored at the last token, then normalized with
                           the mean / std saved at training time: (r - mean) / std; or a `posttrain dpo`
                           folder: its implicit reward beta * log(pi / pi_ref) of the completion
  exact_match              1.0 if the stripped completion equals the reference column, else 0.0
  numeric_match            1.0 if the last number in the completion equals the reference's number
  format:REGEX             1.0 if the stripped completion matches REGEX in full (re.fullmatch, DOTALL)
  path/to/file.py:fn       fn(prompts=[...], completions=[...], **columns) -> list of floats; `prompts`
                           are as the rows gave them (strings or message lists), `columns` every extra
                           dataset column by name, one value per completion (TRL's reward_funcs call)
  http(s)://host/path      POST {"prompts", "completions", **columns} as JSON, expects {"rewards": [...]};
                           `reward_timeout` seconds per call, and a clear error, never a hang

The reference column for the built-ins is the first of `answer`, `reference`, `solution`,
`ground_truth`, `completion` that the data has. Everything is checked before training: the file
exists and defines the function, the endpoint answers a one-row request, the data has the columns.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from posttrain.data.prompts import Prompt
from posttrain.data.schema import Message
from posttrain.errors import ConfigError, PosttrainError

REFERENCE_COLUMNS = ("answer", "reference", "solution", "ground_truth", "completion")
BUILTINS = ("exact_match", "numeric_match", "format:REGEX")


class RewardError(PosttrainError):
    """A reward source failed during training (an endpoint went away, a function returned junk)."""


@dataclass
class CompletionBatch:
    """What a source scores: completions and the prompts (with their rows) they answer."""

    prompts: list[Prompt]
    completions: list[str]

    def columns(self) -> dict[str, list[Any]]:
        names = {k for p in self.prompts for k in p.extra}
        return {k: [p.extra.get(k) for p in self.prompts] for k in sorted(names)}


def _floats(values, n: int, who: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise RewardError(f"reward {who}: expected a list of {n} numbers (one per completion), got {got}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RewardError(f"reward {who}: value {i} is {v!r}, not a finite number")
        out.append(float(v))
    return out


# ---- built-ins ----------------------------------------------------------------------------------

def reference_column(prompts: list[Prompt], who: str) -> str:
    for name in REFERENCE_COLUMNS:
        if all(name in p.extra for p in prompts):
            return name
    first = prompts[0]
    raise ConfigError(f"reward {who} compares completions with a reference answer, but the prompt data "
                      f"({first.source}) has no column {' / '.join(REFERENCE_COLUMNS)} in every row "
                      f"(its extra columns: {sorted(first.extra) or 'none'}); map yours with `columns:`")


_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*(?:\.\d+)?(?:[eE][-+]?\d+)?")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


class BuiltinReward:
    def __init__(self, spec: str):
        self.name = spec if not spec.startswith("format:") else "format"
        self.kind = "format" if spec.startswith("format:") else spec
        self.column: str | None = None
        if self.kind == "format":
            try:
                self.pattern = re.compile(spec[len("format:"):], re.DOTALL)
            except re.error as err:
                raise ConfigError(f"reward_funcs: {spec!r} is not a valid regular expression: {err}") from None

    def check(self, prompts: list[Prompt]) -> None:
        if self.kind != "format":
            self.column = reference_column(prompts, self.name)

    def __call__(self, batch: CompletionBatch) -> list[float]:
        if self.kind == "format":
            return [float(self.pattern.fullmatch(c.strip()) is not None) for c in batch.completions]
        refs = [p.extra[self.column] for p in batch.prompts]
        if self.kind == "exact_match":
            return [float(c.strip() == str(r).strip()) for c, r in zip(batch.completions, refs)]
        out = []
        for c, r in zip(batch.completions, refs):
            got, want = last_number(c), last_number(str(r))
            out.append(float(got is not None and want is not None and math.isclose(got, want, abs_tol=1e-6)))
        return out


# ---- a Python function --------------------------------------------------------------------------

def load_function(spec: str) -> Callable:
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        raise ConfigError(f"reward_funcs: {spec!r} is not of the form path/to/file.py:function_name")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"reward_funcs: {spec!r}: the file {str(file)!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"posttrain_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the user's file: report what broke, with its type
        raise ConfigError(f"reward_funcs: {spec!r}: importing {file} failed: {type(err).__name__}: {err}") from None
    fn = getattr(module, name, None)
    if fn is None:
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ConfigError(f"reward_funcs: {spec!r}: {file} defines no {name!r} (it defines: {defined or 'nothing callable'})")
    if not callable(fn):
        raise ConfigError(f"reward_funcs: {spec!r}: {name!r} in {file} is not a function")
    return fn


class FunctionReward:
    def __init__(self, spec: str):
        self.fn = load_function(spec)
        self.name = spec.rpartition(":")[2]

    def check(self, prompts: list[Prompt]) -> None:
        pass  # the function decides what it needs; it gets every column

    def __call__(self, batch: CompletionBatch) -> list[float]:
        try:
            values = self.fn(prompts=[p.raw for p in batch.prompts], completions=batch.completions, **batch.columns())
        except Exception as err:
            raise RewardError(f"reward function {self.name!r} raised {type(err).__name__}: {err}") from err
        return _floats(values, len(batch.completions), repr(self.name))


# ---- a remote endpoint --------------------------------------------------------------------------

class RemoteReward:
    def __init__(self, url: str, timeout: float):
        self.url, self.timeout, self.name = url, timeout, "remote"

    def check(self, prompts: list[Prompt]) -> None:
        """One request with one row before training: an unreachable or wrong endpoint fails now."""
        try:
            self(CompletionBatch(prompts[:1], [""]))
        except RewardError as err:
            raise ConfigError(f"reward_funcs: {err}") from None

    def __call__(self, batch: CompletionBatch) -> list[float]:
        body = json.dumps({"prompts": [p.raw for p in batch.prompts], "completions": batch.completions,
                           **batch.columns()}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise RewardError(f"reward endpoint {self.url} answered HTTP {err.code}: "
                              f"{err.read()[:200].decode(errors='replace')}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise RewardError(f"reward endpoint {self.url} is unreachable or did not answer within "
                              f"{self.timeout:g}s (reward_timeout): {reason}") from None
        except json.JSONDecodeError:
            raise RewardError(f"reward endpoint {self.url} did not answer with JSON") from None
        if not isinstance(payload, dict) or "rewards" not in payload:
            raise RewardError(f"reward endpoint {self.url} must answer {{\"rewards\": [...]}}, got "
                              f"{str(payload)[:200]}")
        return _floats(payload["rewards"], len(batch.completions), f"endpoint {self.url}")


# ---- a trained reward model ---------------------------------------------------------------------

class ModelReward:
    """A `posttrain rm` folder, rewards normalized with its saved mean / std (when it has them), or a
    `posttrain dpo` folder scored by its implicit reward (train/reward_scoring.py)."""

    def __init__(self, path: str, device: torch.device, batch_size: int, trust_remote_code: bool = False):
        from posttrain.data.pairs import response_renderer
        from posttrain.train.reward_scoring import RewardScorer

        self.name = "model"
        self.scorer = RewardScorer(path, device, trust_remote_code, what="reward_model")
        self.tokenizer = self.scorer.tokenizer
        # Rendered and cut as the reward model was trained (as `posttrain score` does), not as the RL run's prompts.
        self.renderer = response_renderer(self.tokenizer, self.scorer.template)
        self.cutoff_len, self.stats = self.scorer.cutoff_len, self.scorer.stats
        self.batch_size = batch_size

    def check(self, prompts: list[Prompt]) -> None:
        pass

    def __call__(self, batch: CompletionBatch) -> list[float]:
        from posttrain.data.pairs import tokenize_response
        from posttrain.data.prepare import truncate

        sequences = [tokenize_response(self.renderer, p.messages, Message("assistant", c), p.tools, p.source)
                     for p, c in zip(batch.prompts, batch.completions)]
        if self.cutoff_len:
            sequences = [truncate(s, self.cutoff_len) for s in sequences]
        scores = self.scorer(sequences, self.batch_size)
        if self.stats is not None and self.stats[1] > 0:
            scores = (scores - self.stats[0]) / self.stats[1]
        return scores.tolist()


def critic_source(config) -> str:
    """The folder PPO's critic starts from: critic_model, else the reward model (its head a first value estimate;
    a DPO folder scored by its implicit reward has no head, so not that one), else the actor's model."""
    from posttrain.model.reward import implicit_reward_settings

    if config.critic_model:
        return config.critic_model
    if config.reward_model and implicit_reward_settings(config.reward_model) is None:
        return config.reward_model
    return config.model_name_or_path


# ---- several, weighted --------------------------------------------------------------------------

def make_source(spec: str, timeout: float):
    if spec.startswith(("http://", "https://")):
        return RemoteReward(spec, timeout)
    if spec in ("exact_match", "numeric_match") or spec.startswith("format:"):
        return BuiltinReward(spec)
    if ":" in spec or spec.endswith(".py"):
        return FunctionReward(spec)
    raise ConfigError(f"reward_funcs: {spec!r} is not a reward; use one of {', '.join(BUILTINS)}, "
                      "path/to/file.py:function or an http(s):// URL (a reward model goes in reward_model)")


def unique_names(names: list[str]) -> list[str]:
    """Each source's name in the logs (rewards/<name>): a name two sources share gets its position appended."""
    return [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]


class Rewards:
    """The weighted sum of every source; per-source means are logged as rewards/<name>."""

    def __init__(self, sources: list, weights: list[float] | None = None):
        self.sources = sources
        self.weights = weights or [1.0] * len(sources)
        self.names = unique_names([s.name for s in sources])

    def check(self, prompts: list[Prompt]) -> None:
        for source in self.sources:
            source.check(prompts)

    def __call__(self, batch: CompletionBatch) -> tuple[torch.Tensor, dict[str, float]]:
        total, per_source = self.score(batch)
        return total, self.means(per_source)

    def score(self, batch: CompletionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted total [N] and each source's own scores [S, N] (rows in the order of self.names)."""
        per_source = torch.tensor([source(batch) for source in self.sources], dtype=torch.float32)
        return (torch.tensor(self.weights)[:, None] * per_source).sum(dim=0), per_source

    def means(self, per_source: torch.Tensor) -> dict[str, float]:
        return {f"rewards/{n}": per_source[i].mean().item() for i, n in enumerate(self.names)}


def build_rewards(config, device: torch.device, placed=None) -> Rewards:
    """Function files and built-ins are checked here, before any model loads; the reward model last, in its
    own Ray actor when the run is `placed` (placement.RaySession)."""
    sources = [make_source(spec, config.reward_timeout) for spec in config.reward_funcs]
    names = unique_names((["model"] if config.reward_model else []) + [s.name for s in sources])  # as Rewards has them
    if config.retain_metric not in ("reward", *names):
        raise ConfigError(f"retain_metric: {config.retain_metric!r} is not one of this run's rewards; use reward (the "
                          f"total) or one of {', '.join(names)}")
    if config.reward_model:
        args = (config.reward_model, config.per_device_eval_batch_size, config.trust_remote_code)
        if placed is not None:
            from posttrain.train.rl.placement import RayReward

            sources.insert(0, RayReward(placed, *args))
        else:
            sources.insert(0, ModelReward(args[0], device, *args[1:]))
    return Rewards(sources, config.reward_weights)

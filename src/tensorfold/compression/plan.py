"""The compression plan: what happens to each layer, what it costs and what it is predicted to lose.

A :class:`Plan` is plain data: it serialises to JSON (``to_json``/``from_json``, ``save``/``load``),
prints as a table (``table()`` gives a ``rich`` table, ``str(plan)`` plain text) and is all that
``tensorfold.apply`` needs besides the model.

>>> import torch, tensorfold as tf
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
>>> p = tf.plan(model, budget=0.5, methods=("svd",))
>>> p.fraction <= 0.5
True
>>> tf.Plan.from_json(p.to_json()) == p
True
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tensorfold.compression.config import CompressConfig
from tensorfold.errors import FileFormatError, TensorfoldError
from tensorfold.io import write_text_atomic

PLAN_VERSION = 1


def _common_prefix(names: list[str]) -> str:
    """The longest dotted prefix (ending in '.') shared by every name; '' for one name or none."""
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    common = common[: min(len(p) for p in parts) - 1]
    return ".".join(common) + "." if common else ""


# settings that plans written before CompressConfig kept at the top level (and still write there)
_LEGACY_SETTINGS = ("budget", "target", "methods", "include", "exclude", "speedup")


def _config_of(d: dict) -> CompressConfig:
    """The plan's config: its "config" object, or (plans written before the config existed) the
    settings kept at the top level; an allocator recorded as run ("knapsack") is kept as such."""
    if "config" in d:
        return CompressConfig.from_dict(d["config"])
    legacy = {key: d[key] for key in ("budget", "target", "methods") if key in d}
    for key in ("include", "exclude", "speedup"):
        if d.get(key):
            legacy[key] = d[key]
    return CompressConfig(allocator=d.get("allocator", "auto"), **legacy)


def _rank_from_json(rank):
    return tuple(rank) if isinstance(rank, list) else rank


@dataclass
class LayerPlan:
    """The decision for one layer (``method == "dense"`` keeps it as it is)."""

    name: str
    layer: str  # e.g. "Linear(384, 1536)"
    method: str
    rank: int | tuple | None
    options: dict
    params: int
    dense_params: int
    flops: int | None
    dense_flops: int | None
    latency: float | None
    dense_latency: float | None
    error: float  # predicted relative error (outputs when calibrated, else weights)
    sensitivity: float = 1.0
    input_shape: tuple | None = None

    @property
    def factored(self) -> bool:
        return self.method != "dense"

    @property
    def param_fraction(self) -> float:
        return self.params / self.dense_params if self.dense_params else 1.0


@dataclass
class Plan:
    """Per-layer decisions plus the settings that produced them (``config``) and the totals.

    ``budget`` (``config.budget``) is the fraction of ``target`` (params, flops or latency) of the
    covered layers; ``fraction`` the fraction reached; ``model_fraction`` the whole model's parameter
    fraction. ``allocator`` is the allocator that ran ("auto" resolved to "knapsack").
    """

    layers: list[LayerPlan]
    skipped: list[tuple[str, str]]
    config: CompressConfig
    allocator: str
    calibrated: bool
    model_params: int
    model_name: str | None = None
    objective: float = 0.0
    curve: list[tuple[float, float]] = field(default_factory=list)  # (budget, predicted objective)
    spectra: dict[str, list[float]] = field(default_factory=dict)
    latency_cap: float | None = None  # the covered layers' predicted latency cap it meant (fraction of dense)
    model_latency: float | None = None  # the dense model's measured seconds per batch
    measured_speedup: float | None = None  # whole-model speedup of the plan's structure, timed while planning
    # a speed goal's allocate-and-time rounds: what each measured and why the kept one was kept (round,
    # fraction, objective, cap, predicted, measured, met, kept, outcome, then; see describe_speed_round)
    speed_rounds: list[dict] = field(default_factory=list)
    # latency probes timed again as implausible (compression/candidates.py RETIME_FACTOR): layer, method, rank,
    # first and kept seconds, the bound they were judged by, re-timings
    retimed_probes: list[dict] = field(default_factory=list)

    # ---- the settings, read from the config ------------------------------------------------------

    @property
    def budget(self) -> float:
        return self.config.budget

    @property
    def target(self) -> str:
        return self.config.target

    @property
    def methods(self) -> tuple[str, ...]:
        return self.config.methods

    @property
    def include(self) -> tuple[str, ...] | None:
        return self.config.include

    @property
    def exclude(self) -> tuple[str, ...] | None:
        return self.config.exclude

    @property
    def speedup(self) -> float | None:
        """The whole-model speedup asked for (``config.speedup``)."""
        return self.config.speedup

    # ---- totals ---------------------------------------------------------------------------------

    def _total(self, attr: str) -> float | None:
        values = [getattr(lp, attr) for lp in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def params(self) -> int:
        return int(self._total("params"))

    @property
    def dense_params(self) -> int:
        return int(self._total("dense_params"))

    @property
    def flops(self) -> int | None:
        return self._total("flops")

    @property
    def dense_flops(self) -> int | None:
        return self._total("dense_flops")

    @property
    def latency(self) -> float | None:
        return self._total("latency")

    @property
    def dense_latency(self) -> float | None:
        return self._total("dense_latency")

    @property
    def fraction(self) -> float:
        """Fraction of the covered layers' ``target`` cost that the plan keeps."""
        now, before = {
            "params": (self.params, self.dense_params),
            "flops": (self.flops, self.dense_flops),
            "latency": (self.latency, self.dense_latency),
        }[self.target]
        return now / before if before else 1.0

    @property
    def model_params_after(self) -> int:
        return self.model_params - self.dense_params + self.params

    @property
    def model_fraction(self) -> float:
        """Whole-model parameter fraction after compression (embeddings, norms etc. included)."""
        return self.model_params_after / self.model_params if self.model_params else 1.0

    @property
    def predicted_speedup(self) -> float | None:
        """Dense / compressed whole-model latency predicted from the measured dense model (``None`` unless it
        was timed, i.e. with ``speedup``): the kept speed round's prediction, the one its allocation used, when
        the plan has rounds; else from the layers' predicted latencies. The rounds' figure prices a transformer
        block option by the block's time inside the model, while a layer of a block option carries its isolated
        probe (MiniLM: the layer sum said 0.49x for a plan the allocation predicted and measured near 1.9x)."""
        allocated = self._allocated_speedup()
        if allocated is not None:
            return allocated
        if self.model_latency is None or self.latency is None or self.dense_latency is None:
            return None
        rest = max(self.model_latency - self.dense_latency, 0.0)
        return self.model_latency / (rest + self.latency)

    def _allocated_speedup(self) -> float | None:
        """The whole-model speedup the kept speed round's allocation predicted (None without one)."""
        return next((r["predicted"] for r in self.speed_rounds if r.get("kept") and r.get("predicted") is not None),
                    None)

    def totals(self) -> dict:
        def ratio(a, b):
            return None if a is None or not b else a / b

        return {
            "layers": len(self.layers),
            "factored": sum(lp.factored for lp in self.layers),
            "skipped": len(self.skipped),
            "params": self.params,
            "dense_params": self.dense_params,
            "params_fraction": ratio(self.params, self.dense_params),
            "flops": self.flops,
            "dense_flops": self.dense_flops,
            "flops_fraction": ratio(self.flops, self.dense_flops),
            "latency": self.latency,
            "dense_latency": self.dense_latency,
            "latency_fraction": ratio(self.latency, self.dense_latency),
            "budget": self.budget,
            "target": self.target,
            "fraction": self.fraction,
            "model_params": self.model_params,
            "model_params_after": self.model_params_after,
            "model_fraction": self.model_fraction,
            "predicted_objective": self.objective,
            "speedup": self.speedup,
            "latency_cap": self.latency_cap,
            "model_latency": self.model_latency,
            "predicted_speedup": self.predicted_speedup,
            "measured_speedup": self.measured_speedup,
        }

    # ---- serialisation ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        # the settings also at the top level, as plans without a config wrote them (older readers)
        for key in _LEGACY_SETTINGS:
            d[key] = d["config"][key]
        d["skipped"] = [list(s) for s in self.skipped]
        d["totals"] = self.totals()
        d["version"] = PLAN_VERSION
        return d

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if not isinstance(d, dict) or d.get("version") != PLAN_VERSION or "layers" not in d:
            raise FileFormatError(f"not a tensorfold plan (version {PLAN_VERSION} expected)")
        try:
            layers = []
            for lp in d["layers"]:
                lp = dict(lp)
                lp["rank"] = _rank_from_json(lp["rank"])
                lp["input_shape"] = tuple(lp["input_shape"]) if lp.get("input_shape") is not None else None
                lp["options"] = {k: _rank_from_json(v) for k, v in lp.get("options", {}).items()}
                layers.append(LayerPlan(**lp))
            return cls(
                layers=layers,
                skipped=[tuple(s) for s in d["skipped"]],
                config=_config_of(d),
                allocator=d["allocator"],
                calibrated=bool(d["calibrated"]),
                model_params=int(d["model_params"]),
                model_name=d.get("model_name"),
                objective=float(d.get("objective", 0.0)),
                curve=[tuple(p) for p in d.get("curve", [])],
                spectra=dict(d.get("spectra", {})),
                latency_cap=d.get("latency_cap"),
                model_latency=d.get("model_latency"),
                measured_speedup=d.get("measured_speedup"),
                speed_rounds=[dict(r) for r in d.get("speed_rounds", [])],
                retimed_probes=[dict(r) for r in d.get("retimed_probes", [])],
            )
        except FileFormatError:
            raise
        except (KeyError, TypeError, ValueError, TensorfoldError) as exc:
            raise FileFormatError(f"malformed plan: {type(exc).__name__}: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise FileFormatError(f"plan is not valid JSON: {exc}") from None

    def save(self, path) -> None:
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise FileFormatError(f"{path}: no such plan file")
        return cls.from_json(path.read_text())

    # ---- display ----------------------------------------------------------------------------------

    def rows(self) -> list[dict]:
        """One record per layer for tables (numbers as they are, None where unknown)."""
        out = []
        for lp in self.layers:
            out.append({
                "layer": lp.name,
                "shape": lp.layer,
                "method": lp.method,
                "rank": "-" if lp.rank is None else ("x".join(map(str, lp.rank)) if isinstance(lp.rank, tuple)
                                                     else lp.rank),
                "params": lp.params,
                "kept": lp.param_fraction,
                "flops": lp.flops,
                "latency_ms": None if lp.latency is None else lp.latency * 1e3,
                "error": lp.error,
                "sensitivity": lp.sensitivity,
            })
        return out

    def table(self):
        """A ``rich.table.Table`` of the per-layer decisions with a totals row.

        Layer names lose the prefix they all share (e.g. ``0.model.encoder.``), shown in the title.
        """
        from rich.table import Table

        prefix = _common_prefix([lp.name for lp in self.layers])
        title = self.title() + (f"\nlayer names below start with {prefix!r}" if prefix else "")
        t = Table(title=title, title_justify="left")
        for col in ("layer", "shape", "method", "rank", "params", "kept", "FLOPs", "latency ms", "pred. error"):
            t.add_column(col, justify="left" if col in ("layer", "shape", "method") else "right")
        for r in self.rows():
            t.add_row(
                r["layer"][len(prefix):], r["shape"], r["method"], str(r["rank"]), f"{r['params']:,}",
                f"{r['kept']:.2f}",
                "-" if r["flops"] is None else f"{r['flops']:,}",
                "-" if r["latency_ms"] is None else f"{r['latency_ms']:.3f}", f"{r['error']:.3f}",
            )
        tot = self.totals()
        t.add_section()
        t.add_row(
            "total", f"{tot['factored']}/{tot['layers']} factored", "", "", f"{self.params:,}",
            f"{tot['params_fraction']:.3f}", "-" if self.flops is None else f"{self.flops:,}",
            "-" if self.latency is None else f"{self.latency * 1e3:.3f}", "",
        )
        return t

    def title(self) -> str:
        src = f" of {self.model_name}" if self.model_name else ""
        return (f"Plan{src}: {self.allocator} allocation, budget {self.budget:g} of {self.target}, "
                f"{'calibrated' if self.calibrated else 'weight-only'}")

    def summary(self) -> str:
        tot = self.totals()
        lines = [
            self.title(),
            f"covered layers: {tot['factored']} of {tot['layers']} factored, {tot['skipped']} skipped",
            f"{self.target}: {self.fraction:.3f} of the covered layers (budget {self.budget:g})",
            f"params: {self.params:,} of {self.dense_params:,} in covered layers; whole model "
            f"{self.model_params_after:,} of {self.model_params:,} ({self.model_fraction:.3f})",
        ]
        if self.flops is not None:
            lines.append(f"FLOPs: {self.flops:,} of {self.dense_flops:,} ({self.flops / self.dense_flops:.3f})")
        if self.latency is not None and self.dense_latency:
            lines.append(f"predicted latency of the covered layers: {self.latency / self.dense_latency:.3f} of dense")
        if self.speedup is not None and self.model_latency is not None:
            lines.append(f"whole-model speedup asked {self.speedup:g}x: measured {self.measured_speedup:.2f}x while "
                         f"planning (dense model {self.model_latency * 1e3:.2f} ms), predicted "
                         f"{self.predicted_speedup:.2f}x"
                         + (" (the kept round's allocation)" if self._allocated_speedup() is not None else ""))
        lines += [f"  {describe_speed_round(r, self.speedup, self.target)}" for r in self.speed_rounds]
        if self.retimed_probes:
            worst = max(self.retimed_probes, key=lambda r: r["first"] / max(r["kept"], 1e-12))
            lines.append(f"latency probes timed again as implausible: {len(self.retimed_probes)} (e.g. "
                         f"{worst['method']} {worst['layer']}: {worst['first'] * 1e3:.2f} ms, then "
                         f"{worst['kept'] * 1e3:.2f} ms kept)")
        return "\n".join(lines)

    def __str__(self) -> str:
        head = f"{'layer':<40} {'shape':<22} {'method':<8} {'rank':>8} {'params':>10} {'kept':>6} {'error':>7}"
        body = [
            f"{r['layer']:<40} {r['shape']:<22} {r['method']:<8} {str(r['rank']):>8} {r['params']:>10,} "
            f"{r['kept']:>6.2f} {r['error']:>7.3f}"
            for r in self.rows()
        ]
        skipped = [f"skipped {n}: {why}" for n, why in self.skipped]
        return "\n".join([self.summary(), head, *body, *skipped])


def describe_speed_round(record: dict, speedup: float | None, target: str = "params") -> str:
    """One line for a speed goal's round (``Plan.speed_rounds``), e.g. ``round 2 measured 1.93x >= 1.8x (checks
    1.96x [1.92-1.99], 1.93x [1.90-1.95]), kept as the most faithful (0.500 of the params, predicted error
    0.1214, predicted 1.49x)``: the lower of a plan's checks is its measurement, [q1-q3] each check's spread."""
    sign = ">=" if record.get("met") else "<"
    checks = record.get("checks") or []
    quartiles = record.get("quartiles") or []
    shown = [f"{c:.2f}x" + (f" [{q[0]:.2f}-{q[1]:.2f}]" if q else "")
             for c, q in zip(checks, [*quartiles, *[None] * len(checks)])]
    # a check's figure is the median of paired ratios; [q1-q3] is its middle half (older plans: none)
    timed = f" (checks {', '.join(shown)})" if len(checks) > 1 or quartiles else ""
    predicted = record.get("predicted")
    detail = f"{record['fraction']:.3f} of the {target}, predicted error {record['objective']:.4g}" + (
        f", predicted {predicted:.2f}x" if predicted is not None else "")
    then = f"; then {record['then']}" if record.get("then") else ""
    return (f"round {record['round']} measured {record['measured']:.2f}x {sign} {speedup:g}x{timed}, "
            f"{record['outcome']} ({detail}){then}")

"""Run configuration: every key, its default, type and allowed values.

The same keys are Flower's run config (``[tool.flwr.app.config]`` in ``pyproject.toml``, ``flwr run
--run-config``, ``context.run_config``) and ``fl-sim run KEY=VALUE`` arguments. :data:`KEYS` is the single source
of truth; ``fl-sim keys --toml`` prints the ``pyproject.toml`` block and a test checks the two agree.

A resolved config is a plain ``dict[str, bool | int | float | str]`` holding every key. Errors are
:class:`ConfigError` with a one-line message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Value = bool | int | float | str


class ConfigError(ValueError):
    """A run-config key or value is not allowed. ``str(err)`` is one line for the user."""


@dataclass(frozen=True)
class Key:
    """One run-config key.

    Attributes:
        default: default value; its type is the key's type (``victim`` also accepts ints, see ``also_int``).
        help: one-line description (units included).
        choices: allowed values, or a callable returning them (registries are read lazily).
        low, high: inclusive numeric bounds; ``low_open`` makes the lower bound exclusive.
        also_int: a ``str`` key that also accepts an int (TOML ``victim=3``).
    """

    default: Value
    help: str
    choices: tuple[str, ...] | Callable[[], Iterable[str]] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    also_int: bool = False

    def allowed(self) -> list[str] | None:
        if self.choices is None:
            return None
        return sorted(self.choices() if callable(self.choices) else self.choices)

    def describe(self) -> str:
        choices = self.allowed()
        if choices is not None:
            return "one of " + ", ".join(choices)
        kind = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}[
            type(self.default).__name__]
        if self.low is None and self.high is None:
            return kind
        lo = "" if self.low is None else (f"> {self.low:g}" if self.low_open else f">= {self.low:g}")
        hi = "" if self.high is None else f"<= {self.high:g}"
        return f"{kind} " + " and ".join(p for p in (lo, hi) if p)


def _datasets() -> list[str]:
    from fl_sim.data import DATASETS

    return list(DATASETS)


def _partitioners() -> list[str]:
    from fl_sim.data import PARTITIONERS

    return list(PARTITIONERS)


def _models() -> list[str]:
    from fl_sim.models import MODELS

    return list(MODELS)


def _attacks() -> list[str]:
    from attacker import ATTACKS

    return list(ATTACKS)


def _label_methods() -> list[str]:
    from attacker.labels import LABEL_METHODS

    return list(LABEL_METHODS)


def _defenses() -> list[str]:
    from clients.defenses import DEFENSES

    return list(DEFENSES)


#: Every run-config key, in the order ``fl-sim keys`` prints them.
KEYS: dict[str, Key] = {
    # --- federation and runtime ---------------------------------------------------------------------------
    "num-server-rounds": Key(300, "number of FL rounds", low=1),
    "num-supernodes": Key(10, "number of clients (simulated SuperNodes, or SuperNodes expected in deployment)", low=1),
    "fraction-train": Key(1.0, "fraction of connected clients sampled for training each round", low=0, low_open=True,
                          high=1),
    "fraction-evaluate": Key(0.0, "fraction of clients sampled for federated evaluation each round (0 = off)", low=0,
                             high=1),
    "seed": Key(0, "seed for model init, partitions, client sampling and attacks"),
    "round-timeout": Key(300.0, "seconds the server waits for the replies of one round", low=0, low_open=True),
    "node-timeout": Key(120.0, "seconds the server waits for num-supernodes clients to connect", low=0,
                        low_open=True),
    "client-num-cpus": Key(1.0, "CPU cores per simulated client (also caps its torch threads)", low=0,
                           low_open=True),
    "client-num-gpus": Key(0.0, "GPU fraction per simulated client (0 = CPU)", low=0),
    "client-dropout": Key(0.0, "probability that a sampled client drops out of a training round (it replies with "
                               "an error instead of training; seeded by seed, round and partition id)", low=0, high=1),
    "min-replies": Key(1, "fewest usable train replies that update the global model; a round with fewer keeps the "
                          "previous model and is logged as skipped", low=1),
    "out-dir": Key("runs", "folder that receives the run directory"),
    "run-name": Key("", "run directory name (empty = timestamp and settings)"),
    # --- data ------------------------------------------------------------------------------------------------
    "dataset": Key("fashion-mnist", "dataset", choices=_datasets),
    "data-dir": Key("", "folder with the full dataset files (empty: the embedded Fashion-MNIST subset, "
                        "~/.cache/fl-sim/data for the others)"),
    "partition": Key("iid", "how the training split is divided among clients", choices=_partitioners),
    "dirichlet-alpha": Key(0.5, "concentration of the Dirichlet label skew (partition=dirichlet)", low=0,
                           low_open=True),
    "eval-every": Key(1, "central test-set evaluation every N rounds (the last round is always evaluated)", low=1),
    # --- model and local training ------------------------------------------------------------------------
    "model": Key("lenet-tanh", "model architecture", choices=_models),
    "mode": Key("fedsgd", "local training: fedsgd = one gradient on one batch, fedavg = several SGD steps",
                choices=("fedsgd", "fedavg")),
    "batch-size": Key(1, "local batch size B", low=1),
    "lr": Key(0.15, "client SGD learning rate (round 1 value under lr-schedule)", low=0, low_open=True),
    "lr-schedule": Key("cosine", "learning rate over rounds, sent by the server each round",
                       choices=("constant", "cosine")),
    "local-epochs": Key(1, "fedavg: local epochs E (when local-steps = 0)", low=1),
    "local-steps": Key(0, "fedavg: local SGD steps K (0 = use local-epochs)", low=0),
    # --- defense ---------------------------------------------------------------------------------------------
    "defense": Key("none", "client-side gradient defense", choices=_defenses),
    "defense-prune-rate": Key(80.0, "prune: percent of each gradient tensor's entries zeroed (smallest magnitudes)",
                              low=0, high=100),
    "defense-dp-clip": Key(1.0, "dp-*: clipping norm C of each step's gradient (L2 for gaussian, L1 for laplace)",
                           low=0, low_open=True),
    "defense-dp-epsilon": Key(10.0, "dp-*: epsilon of one noised release (one local step)", low=0, low_open=True),
    "defense-dp-delta": Key(1e-5, "dp-*: delta of one Gaussian release; also the delta of the reported budget",
                            low=0, low_open=True, high=0.5),
    "defense-dp-sensitivity": Key(0.0, "dp-*: sensitivity of one release (0 = the clipping norm)", low=0),
    "defense-dp-noise": Key(0.0, "dp-*: noise scale given directly (Gaussian std / Laplace b; 0 = from epsilon, "
                                 "delta)", low=0),
    "defense-soteria-rate": Key(70.0, "soteria: percent of the FC layer's input features pruned", low=0, high=100),
    "defense-soteria-eps": Key(0.1, "soteria: epsilon in the score's denominator ||dr/dx|| / (r + eps)", low=0),
    "defense-soteria-signed": Key(False, "soteria: divide by the signed r as the public code does (default |r|)"),
    "defense-gd-slices": Key(10, "graddefense: number of slices S", low=1),
    "defense-gd-perturb-slices": Key(5, "graddefense: slices perturbed per step M (<= S)", low=0),
    "defense-gd-sigma": Key(0.1, "graddefense: std of the Gaussian noise on the perturbed slices", low=0),
    "defense-gd-clip": Key(False, "graddefense: clip each sample's part of each perturbed slice (per-sample "
                                  "gradients)"),
    "defense-gd-clip-bound": Key(0.0, "graddefense: per-sample slice clipping bound (0 = sigma, as the paper's code)",
                                 low=0),
    "defense-gd-root-per-class": Key(5, "graddefense: root-set samples per class for the layer sensitivity", low=1),
    "defense-gd-sensitivity-every": Key(50, "graddefense: recompute the sensitivity every N rounds (0 = once)",
                                        low=0),
    "defense-gd-compensation": Key(True, "graddefense: server-side Marchenko-Pastur compensation of the aggregate"),
    "defense-gd-q": Key(6.0, "graddefense: aspect ratio Q = V/W of the compensation matrix", low=1),
    "defense-gd-noise-variance": Key("mean", "graddefense: noise variance the compensation assumes: mean = of the "
                                             "weighted mean (correct), sum = K(M/S)sigma^2 (the paper's code)",
                                     choices=("mean", "sum")),
    "defense-gd-reshape": Key("pad", "graddefense: V x W reshape: pad = zero-pad to W = floor(sqrt(P/Q)), "
                                     "divisor = exact divisor of P (the paper's code)", choices=("pad", "divisor")),
    "defense-gd-keep-below": Key(False, "graddefense: compensation also keeps eigenvectors below the noise bulk "
                                        "(the paper's code)"),
    "defense-quantize-format": Key("int8", "quantize: format the gradient is cast through",
                                   choices=("float16", "bfloat16", "int8")),
    # --- attack ----------------------------------------------------------------------------------------------
    "attack": Key("idlg", "gradient-inversion attack the server runs", choices=_attacks),
    "attack-every": Key(25, "attack the victim's update every N rounds, from round 1 (0 = never)", low=0),
    "victim": Key("0", "partition id of the attacked client, or 'random'", also_int=True),
    "attack-iterations": Key(0, "optimizer iterations per attack (0 = the attack's default)", low=0),
    "attack-restarts": Key(1, "random restarts per attack; the best objective is kept", low=1),
    "attack-time-limit": Key(120.0, "seconds per attack before it stops with its best result (0 = none)", low=0),
    "attack-ignore-layers": Key("", "parameter-name patterns left out of the matching loss, comma-separated "
                                    "(fnmatch; a module name covers its parameters; 'classifier' = the last linear "
                                    "layer); 'fc' is the PLD-muted attack"),
    "attack-layer-weights": Key("", "per-layer weights in the matching loss, 'PATTERN:WEIGHT,...' (same patterns; "
                                    "other layers weigh 1)"),
    "attack-infer-mask": Key(False, "infer a pruning mask from the exact zeros of the observed update and apply it to "
                                    "the trial gradient"),
    "attack-clip-bound": Key(0.0, "replicate a known clipping bound C on the trial gradient, g·min(1, C/||g||) "
                                  "(0 = off)", low=0),
    "attack-clip-scope": Key("gradient", "what the clipping bound applied to: each local step's gradient or the "
                                         "weight update", choices=("gradient", "update")),
    "attack-tv": Key(-1.0, "total-variation weight of attacks with an image prior (ig, ig-fedavg; negative = the "
                           "attack's default)", low=-1),
    "attack-init-std": Key(-1.0, "std of the Gaussian initialisation of the dummy images in normalised space "
                                 "(negative = the attack's default: dlg/idlg 0.1, ig 1)", low=-1),
    "attack-labels": Key("auto", "label recovery for batches of B > 1 (B = 1 always uses iDLG's exact rule)",
                         choices=_label_methods),
    # --- results ---------------------------------------------------------------------------------------------
    "audit": Key(True, "clients report the indices of the samples they trained on in an audit-only record "
                       "that only the evaluator reads (needed to score attacks)"),
}


def defaults() -> dict[str, Value]:
    """Every key with its default value."""
    return {k: key.default for k, key in KEYS.items()}


def _unknown(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, KEYS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {name!r}{hint}; run 'fl-sim keys' for the list of keys")


def _bad(name: str, value: Any) -> ConfigError:
    return ConfigError(f"{name}={value!r} is not allowed; {name} must be {KEYS[name].describe()}")


def coerce(name: str, value: Any) -> Value:
    """Check one value (already typed, as Flower's TOML parser gives it) and return it with the key's type.

    Raises:
        ConfigError: unknown key, wrong type, out of range or not among the choices.
    """
    if name not in KEYS:
        raise _unknown(name)
    key = KEYS[name]
    kind = type(key.default)
    if kind is bool:
        if not isinstance(value, bool):
            raise _bad(name, value)
        out: Value = value
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(name, value)
        out = value
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _bad(name, value)
        out = float(value)
    else:
        if key.also_int and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise _bad(name, value)
        out = value
    if kind in (int, float):
        if key.low is not None and (out < key.low or (key.low_open and out == key.low)):
            raise _bad(name, value)
        if key.high is not None and out > key.high:
            raise _bad(name, value)
    allowed = key.allowed()
    if allowed is not None and out not in allowed:
        raise _bad(name, value)
    return out


def parse_value(name: str, text: str) -> Value:
    """Parse the text of ``KEY=VALUE`` for key ``name`` (TOML-like: ``true``, ``3``, ``0.1``, ``"x"`` or ``x``).

    Raises:
        ConfigError: as :func:`coerce`.
    """
    if name not in KEYS:
        raise _unknown(name)
    kind = type(KEYS[name].default)
    raw = text.strip()
    unquoted = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'" else raw
    value: Any = unquoted
    if kind is bool:
        value = {"true": True, "false": False}.get(raw.lower(), raw)
    elif kind is int:
        try:
            value = int(raw)
        except ValueError:
            value = raw
    elif kind is float:
        try:
            value = float(raw)
        except ValueError:
            value = raw
    return coerce(name, value)


def parse_overrides(items: Iterable[str]) -> dict[str, Value]:
    """Parse ``["KEY=VALUE", ...]`` into a dict of checked values.

    Raises:
        ConfigError: an item without ``=``, an unknown key or a bad value.
    """
    out: dict[str, Value] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{item!r} is not KEY=VALUE; run 'fl-sim keys' for the list of keys")
        name, text = item.split("=", 1)
        out[name.strip()] = parse_value(name.strip(), text)
    return out


def resolve(overrides: Mapping[str, Any] | None = None) -> dict[str, Value]:
    """Defaults updated with ``overrides``, every value checked, then the cross-key checks of :func:`check`.

    Raises:
        ConfigError: the first problem found.
    """
    cfg = defaults()
    for name, value in (overrides or {}).items():
        cfg[name] = coerce(name, value)
    check(cfg)
    return cfg


def check_attack_options(cfg: Mapping[str, Value], model: Any = None) -> None:
    """Parse the attack option keys; given the model, check that every layer pattern names one of its parameters."""
    from dataclasses import replace

    from attacker.options import AttackOptions

    try:
        options = AttackOptions.from_config(cfg)
    except ValueError as exc:
        raise ConfigError(f"attack-layer-weights={cfg.get('attack-layer-weights')!r} is not allowed: {exc}") from exc
    if model is None:
        return
    for key, opts in (("attack-ignore-layers", replace(options, layer_weights=())),
                      ("attack-layer-weights", replace(options, ignore_layers=()))):
        try:
            opts.weights_for(model)
        except ValueError as exc:
            raise ConfigError(f"{key}={cfg.get(key)!r} is not allowed for model={cfg['model']!r}: {exc}") from exc
    from attacker import ATTACKS

    attack = ATTACKS.get(str(cfg.get("attack")))
    if attack is not None and attack.check is not None:
        try:
            attack.check(model, cfg)
        except ValueError as exc:
            raise ConfigError(f"attack={cfg['attack']!r} is not allowed with model={cfg['model']!r}: {exc}") from exc
    if not any(w > 0 for w in options.weights_for(model).values()):
        raise ConfigError(f"attack-ignore-layers={cfg.get('attack-ignore-layers')!r} is not allowed: it leaves every "
                          f"layer of model={cfg['model']!r} out of the matching loss")


def check(cfg: Mapping[str, Value]) -> None:
    """Checks that involve several keys and need no data (cheap; the apps call it on every start).

    Raises:
        ConfigError: e.g. a victim id outside ``[0, num-supernodes)``.
    """
    _check_defense(cfg)
    check_attack_options(cfg)
    victim = str(cfg["victim"])
    n = int(cfg["num-supernodes"])
    sampled = max(1, int(n * float(cfg["fraction-train"])))
    if int(cfg["min-replies"]) > sampled:
        raise ConfigError(
            f"min-replies={cfg['min-replies']} is not allowed; only {sampled} clients are sampled per round "
            f"(num-supernodes={n}, fraction-train={cfg['fraction-train']}), so min-replies must be <= {sampled}"
        )
    if victim != "random" and not (victim.isdigit() and int(victim) < n):
        raise ConfigError(
            f"victim={victim!r} is not allowed; victim must be 'random' or a partition id in 0..{n - 1} "
            f"(num-supernodes={n})"
        )


def _check_defense(cfg: Mapping[str, Value]) -> None:
    """Defense/model and defense-key combinations that cannot work."""
    from clients.defenses import DEFENSES

    defense = DEFENSES[str(cfg["defense"])]
    if defense.models and str(cfg["model"]) not in defense.models:
        raise ConfigError(f"model={cfg['model']!r} is not allowed with defense={cfg['defense']!r}; "
                          f"model must be one of {', '.join(defense.models)}")
    if int(cfg["defense-gd-perturb-slices"]) > int(cfg["defense-gd-slices"]):
        raise ConfigError(f"defense-gd-perturb-slices={cfg['defense-gd-perturb-slices']} is not allowed; it must be "
                          f"<= defense-gd-slices={cfg['defense-gd-slices']}")


def check_feasible(cfg: Mapping[str, Value]) -> None:
    """Checks that need the data, the model or the machine (run once before a simulation starts).

    Loads the dataset (cached), builds the partitions and the model, and looks for CUDA when GPUs are asked for.

    Raises:
        ConfigError: a batch larger than some partition, a model that does not fit the dataset, GPUs requested on
            a machine without CUDA, or data that cannot be loaded.
    """
    import torch

    from fl_sim.data import DataError, load_dataset, partitions
    from fl_sim.models import build_model

    try:
        ds = load_dataset(str(cfg["dataset"]), str(cfg["data-dir"]))
    except DataError as exc:
        raise ConfigError(f"dataset={cfg['dataset']!r}: {exc}") from exc
    try:
        parts = partitions(ds.name, str(cfg["data-dir"]), int(cfg["num-supernodes"]), str(cfg["partition"]),
                           float(cfg["dirichlet-alpha"]), int(cfg["seed"]))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    smallest = min(len(p) for p in parts)
    if int(cfg["batch-size"]) > smallest:
        raise ConfigError(
            f"batch-size={cfg['batch-size']} is not allowed; the smallest partition holds {smallest} samples "
            f"({cfg['num-supernodes']} clients, partition={cfg['partition']!r}), so batch-size must be <= {smallest}"
        )
    try:
        model = build_model(str(cfg["model"]), ds.input_shape, ds.num_classes)
        with torch.no_grad():
            model(torch.zeros(1, *ds.input_shape))
    except Exception as exc:  # a model that cannot take this input shape
        raise ConfigError(
            f"model={cfg['model']!r} does not accept {cfg['dataset']} inputs {ds.input_shape}: {exc}"
        ) from exc
    check_attack_options(cfg, model)
    if float(cfg["client-num-gpus"]) > 0 and not torch.cuda.is_available():
        raise ConfigError(
            f"client-num-gpus={cfg['client-num-gpus']} is not allowed on this machine: CUDA is not available; "
            "use client-num-gpus=0"
        )


def pyproject_block(values: Mapping[str, Value] | None = None) -> str:
    """The ``[tool.flwr.app.config]`` TOML block with every key (defaults unless ``values`` are given)."""
    import tomli_w

    cfg = dict(values or defaults())
    return "[tool.flwr.app.config]\n" + tomli_w.dumps(cfg)

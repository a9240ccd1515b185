"""``fl-sim export``: an intercepted update as breaching's ``server_payload`` / ``shared_data`` pair.

Breaching (Geiping et al., ``JonasGeiping/breaching``, ``minimal_example.py``) attacks what a server sent and what a
user shared::

    server_payload = [dict(parameters=[...], buffers=[...] or None, metadata=<data config>)]
    shared_data = [dict(gradients=[...], buffers=[...] or None,
                        metadata=dict(num_data_points=N, labels=None or tensor, local_hyperparams=None or dict))]
    attacker.reconstruct(server_payload, shared_data, {}, dryrun=False)

:func:`breaching_pair` builds exactly that from the update a run's server intercepted
(``RUN_DIR/attacks/round_NNNN_update.pt``, the server's view, never the audit record), so breaching and LeakPro users
can run their own attacks on what fl-sim's attacker got:

* ``parameters``: the global model the server sent, in ``model.parameters()`` order of fl-sim's model of that name
  (``fl_sim.task.models.build_model(model, input_shape, num_classes)``, whose state_dict the file also names);
* ``gradients``: the update as gradients, ``attacker.payload.update_to_gradient(update, lr, K)`` =
  ``−Δ / (lr·K)`` — the batch gradient under FedSGD, the mean of the K step gradients under FedAvg;
* ``labels``: ``None`` (the server does not know them), ``num_data_points``: the client's ``num-examples``;
* ``local_hyperparams``: ``None``: breaching reads ``gradients`` as parameter *differences* when it is set. A
  multi-step (FedAvg) update can be attacked with breaching's multi-step users from the ``fl_sim`` block: the raw
  update (``update``) and the train config (``lr``, ``local_steps``, ``batch_size``);
* ``buffers``: ``None`` in both: fl-sim's clients train in train mode (BatchNorm uses batch statistics), which is
  what breaching models when neither side sends buffers. The buffers the server sent and those the client returned
  are in the ``fl_sim`` block;
* ``metadata`` (server side): a plain dict with breaching's data-config fields (``name``, ``modality``, ``task``,
  ``size``, ``classes``, ``shape``, ``normalize``, ``mean``, ``std``). Breaching reads it by attribute, so wrap it:
  ``server_payload[0]["metadata"] = omegaconf.OmegaConf.create(server_payload[0]["metadata"])``.

The file is a ``torch.save`` of plain dicts, lists and tensors (``torch.load(FILE, weights_only=True)`` reads it):
``{"server_payload": [...], "shared_data": [...], "fl_sim": {...}}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from fl_sim.cli.common import fail

#: Format tag of the exported file's ``fl_sim`` block.
EXPORT_FORMAT = "fl-sim-breaching/1"


def breaching_pair(payload: Any, server_round: int | None = None, client: str | None = None) -> dict[str, Any]:
    """breaching's ``server_payload`` / ``shared_data`` for one intercepted update (see the module docstring).

    Args:
        payload: the server's view, an uncut :class:`~attacker.payload.AttackPayload` (``train_config`` and
            ``num_examples`` present).
        server_round, client: recorded in the ``fl_sim`` block.

    Returns:
        ``{"server_payload": [dict], "shared_data": [dict], "fl_sim": dict}``; tensors are ``float32`` on the CPU,
        in ``model.parameters()`` / ``model.buffers()`` order of ``payload.build_model()``.

    Raises:
        ValueError: the payload lacks the train config or ``num-examples`` (the update cannot become gradients).
    """
    from attacker.payload import update_to_gradient

    if payload.train_config is None or payload.num_examples is None:
        raise ValueError("the intercepted update has no train config or num-examples; it cannot become gradients")
    model = payload.build_model("cpu")
    names = [n for n, _ in model.named_parameters()]
    buffer_names = [n for n, _ in model.named_buffers()]
    steps = payload.train_config.steps(payload.num_examples)
    gradients = update_to_gradient([payload.update[n].float() for n in names], float(payload.train_config.lr), steps)
    metadata = {
        "name": None, "modality": "vision", "task": "classification", "size": None,
        "classes": int(payload.num_classes), "shape": [int(v) for v in payload.input_shape], "normalize": True,
        "mean": [float(v) for v in payload.mean], "std": [float(v) for v in payload.std],
    }
    server_payload = [{"parameters": [payload.global_state[n].detach().float().clone() for n in names],
                       "buffers": None, "metadata": metadata}]
    shared_data = [{"gradients": [g.detach().clone() for g in gradients], "buffers": None,
                    "metadata": {"num_data_points": int(payload.num_examples), "labels": None,
                                 "local_hyperparams": None}}]
    tc = payload.train_config
    info = {
        "format": EXPORT_FORMAT, "round": server_round, "client": client, "model": payload.model_name,
        "input_shape": [int(v) for v in payload.input_shape], "num_classes": int(payload.num_classes),
        "parameter_names": names, "buffer_names": buffer_names,
        "mode": tc.mode, "lr": float(tc.lr), "batch_size": int(tc.batch_size), "local_steps": int(steps),
        "num_examples": int(payload.num_examples),
        "defense": None if payload.defense is None else payload.defense.name,
        "update": [payload.update[n].detach().float().clone() for n in names],
        "global_buffers": [payload.global_state[n].detach().clone() for n in buffer_names if n in payload.global_state],
        "returned_buffers": ([payload.buffers[n].detach().clone() for n in buffer_names if n in payload.buffers]
                             if payload.buffers else None),
    }
    return {"server_payload": server_payload, "shared_data": shared_data, "fl_sim": info}


def export(
    run_dir: Path = typer.Argument(..., help="a run directory (fl-sim run --out, or runs/...)"),
    server_round: int = typer.Option(..., "--round", help="an attacked round (attacks/round_NNNN_update.pt)"),
    out: Path = typer.Option(None, "--out", help="file to write (default: RUN_DIR/export/round_NNNN_breaching.pt)"),
) -> None:
    """Write the update the server intercepted in --round as breaching's server_payload / shared_data pair."""
    import torch

    from fl_sim.results import intercepted_path, load_payload

    run_dir = run_dir.expanduser().resolve()
    if not (run_dir / "config.toml").is_file():
        fail(f"RUN_DIR={str(run_dir)!r} is not a run directory (no config.toml)")
    path = intercepted_path(run_dir, server_round)
    if not path.is_file():
        saved = sorted(int(p.name[6:10]) for p in (run_dir / "attacks").glob("round_*_update.pt"))
        fail(f"--round={server_round} is not allowed; {run_dir} holds intercepted updates of rounds "
             f"{', '.join(map(str, saved)) or '(none: no attacked round finished)'}")
    try:
        payload, raw = load_payload(path)
        pair = breaching_pair(payload, server_round, raw.get("client"))
    except ValueError as exc:
        fail(f"--round={server_round}: {exc}")
    pair["fl_sim"]["dataset"] = _dataset_name(run_dir)
    pair["server_payload"][0]["metadata"]["name"] = pair["fl_sim"]["dataset"]
    out = (out or run_dir / "export" / f"round_{server_round:04d}_breaching.pt").expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(pair, out)
    info = pair["fl_sim"]
    typer.echo(f"round {server_round}, client {info['client']}: {info['model']} {tuple(info['input_shape'])}, "
               f"{len(info['parameter_names'])} gradient tensors ({info['mode']}, lr {info['lr']:g}, "
               f"{info['local_steps']} local step(s), {info['num_examples']} example(s))")
    typer.echo(str(out))


def _dataset_name(run_dir: Path) -> str | None:
    import tomllib

    try:
        return str(tomllib.loads((run_dir / "config.toml").read_text()).get("dataset"))
    except (OSError, tomllib.TOMLDecodeError):
        return None

"""The cards of a deck: finding, checking and stacking members from finished workdirs.

A member is one realization r of a finished card_jax run (its workdir holds config.json,
results.json and the final checkpoint). `deck.members` lists workdirs, globs or `DIR:r`; a
workdir without `:r` contributes all its R realizations, in order. Describing and checking
members reads only the JSON files, so a bad deck fails before any weight is loaded.

Members of one deck must agree on model (name and kw), dataset (name, classes, image shape),
method (name and scope) and sparsity (paper §3.2: "same method and sparsity"); their
`data.augment` is their gate group, and every group needs the same number of members.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import pathlib
import re
from typing import Any

from card_jax import config_util

RESULTS_FILE = "results.json"   # card_jax.run.RESULTS_FILE (importing run would import JAX)
CONFIG_FILE = "config.json"     # card_jax.run.CONFIG_FILE


class DeckError(config_util.ConfigError):
    """The members do not make a valid deck; the message names the members and the field."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One card: realization `realization` of the run in `workdir`, and what it was trained as.

    `memory_mb` and `packed_bytes` are that realization's entries in the run's results.json.
    """

    workdir: str
    realization: int
    group: str
    method: str
    scope: str
    sparsity: float
    model: str
    model_kw: dict
    dataset: str
    num_classes: int
    image_shape: tuple
    memory_mb: float
    packed_bytes: int
    data_config: dict = dataclasses.field(compare=False, repr=False)

    @property
    def label(self) -> str:
        return f"{self.workdir}:{self.realization}"

    def to_json(self) -> dict:
        """The deck results.json entry of this member."""
        return {"workdir": self.workdir, "realization": self.realization, "group": self.group,
                "method": self.method, "sparsity": self.sparsity}


_SELECT = re.compile(r"^(?P<path>.+):(?P<r>\d+)$")


def parse_spec(spec: str) -> list[tuple[str, int | None]]:
    """`"A,B:1,runs/aug*"` -> [(workdir, realization or None = all)], globs expanded (sorted).

    Raises DeckError for an empty list, a pattern matching no workdir, or a missing directory.
    """
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        raise DeckError("deck.members is empty")
    out = []
    for item in items:
        match = _SELECT.match(item)
        path, r = (match["path"], int(match["r"])) if match else (item, None)
        if glob.has_magic(path):
            found = sorted(p for p in glob.glob(path) if (pathlib.Path(p) / CONFIG_FILE).exists())
            if not found:
                raise DeckError(f"deck.members: {path!r} matches no card_jax workdir "
                                f"(no directory with a {CONFIG_FILE})")
            out.extend((p, r) for p in found)
        else:
            if not pathlib.Path(path).is_dir():
                raise DeckError(f"deck.members: {path!r} is not a directory")
            out.append((path, r))
    return out


def _read_json(path: pathlib.Path, what: str) -> dict:
    if not path.exists():
        raise DeckError(f"deck member {path.parent}: {path.name} not found ({what})")
    return json.loads(path.read_text(encoding="utf-8"))


def describe(spec: str) -> list[Member]:
    """The members of `deck.members`, from their workdirs' config.json and results.json."""
    members = []
    for workdir, selected in parse_spec(spec):
        root = pathlib.Path(workdir)
        config = _read_json(root / CONFIG_FILE, "is it a card_jax workdir?")
        results = _read_json(root / RESULTS_FILE, "the run has not finished")
        if results.get("kind") == "deck":
            raise DeckError(f"deck member {workdir} is itself a deck; list its members instead")
        count = int(config["train"]["realizations"])
        if selected is not None and not 0 <= selected < count:
            raise DeckError(f"deck member {workdir}:{selected}: the run has {count} "
                            f"realization(s) (0..{count - 1})")
        method = config["method"]["name"]
        info = results["dataset"]
        missing = [k for k in ("memory_mb", "packed_bytes") if k not in results]
        if missing:
            raise DeckError(f"deck member {workdir}: its results.json has no {missing} (written "
                            "by an older card_jax?); re-evaluate the run first")
        for r in ([selected] if selected is not None else range(count)):
            members.append(Member(
                workdir=str(workdir), realization=r, group=config["data"]["augment"],
                method=method, scope=config["method"].get("scope", "global"),
                sparsity=0.0 if method == "dense" else float(config["method"]["sparsity"]),
                model=config["model"]["name"], model_kw=dict(config["model"]["kw"]),
                dataset=info["name"], num_classes=int(info["num_classes"]),
                image_shape=tuple(info["image_shape"]),
                memory_mb=float(results["memory_mb"][r]),
                packed_bytes=int(results["packed_bytes"][r]),
                data_config=config["data"]))
    labels = [m.label for m in members]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise DeckError(f"deck.members lists the same card twice: {', '.join(twice)}")
    return members


# (what, value of a member) for the fields every member must share, in the order checked.
_SHARED = (
    ("model", lambda m: f"{m.model} {json.dumps(m.model_kw, sort_keys=True)}"),
    ("dataset", lambda m: f"{m.dataset} ({m.num_classes} classes, images "
                          f"{'x'.join(map(str, m.image_shape))})"),
    ("method", lambda m: f"{m.method} ({m.scope})"),
    ("sparsity", lambda m: f"{m.sparsity:g}"),
)


def check(members: list[Member], groups: list[str]) -> dict[str, list[int]]:
    """Checks that `members` make a deck; returns {group: member indices} in deck order.

    Raises DeckError naming the mismatch: a shared field that differs (model, dataset,
    method, sparsity), a member whose data.augment is not a gate group, a group without
    members or unequal group sizes.
    """
    first = members[0]
    for what, value in _SHARED:
        for m in members[1:]:
            if value(m) != value(first):
                raise DeckError(f"deck members differ in {what}: {first.label} has "
                                f"{value(first)}, {m.label} has {value(m)}; a deck combines "
                                "cards of the same model, dataset, method and sparsity")
    by_group: dict[str, list[int]] = {g: [] for g in groups}
    for k, m in enumerate(members):
        if m.group not in by_group:
            raise DeckError(f"deck member {m.label} was trained with data.augment="
                            f"{m.group!r}, which is not a gate group (deck.groups="
                            f"{','.join(groups)})")
        by_group[m.group].append(k)
    sizes = {g: len(ks) for g, ks in by_group.items()}
    if min(sizes.values()) == 0 or len(set(sizes.values())) != 1:
        raise DeckError("deck groups must have the same number of members (> 0), got "
                        + ", ".join(f"{g} {n}" for g, n in sizes.items()))
    return by_group


def load_stacks(members: list[Member]) -> tuple[Any, Any, Any]:
    """(graphdef, params, batch_stats) with numpy leaves stacked `[K, ...]` in members order.

    The params are the EFFECTIVE ones (the compression method's masks and binarisation
    applied), so decks need no method code at inference. Each workdir is restored once.
    """
    import jax
    import numpy as np

    from card_jax import export, state as state_lib

    cache: dict[str, tuple] = {}
    graphdef, params, stats = None, [], []
    for m in members:
        if m.workdir not in cache:
            # load_final_state builds the run's experiment, whose freshly initialised state
            # serves only as the shape template of the restore: compiling that throw-away
            # initialisation without XLA's optimisation passes cuts the load 2-3x (smoke
            # runs: 4.3 s -> 1.7 s per workdir); the restored values are unaffected.
            previous = jax.config.read("jax_disable_most_optimizations")
            jax.config.update("jax_disable_most_optimizations", True)
            try:
                exp, state = export.load_final_state(m.workdir)
            finally:
                jax.config.update("jax_disable_most_optimizations", previous)
            apply = jax.jit(exp.method.apply)
            cache[m.workdir] = (exp, state, apply)
        exp, state, apply = cache[m.workdir]
        effective = apply(state_lib.index(state.params, m.realization),
                          state_lib.index(state.method_state, m.realization))
        params.append(jax.tree.map(np.asarray, effective))
        stats.append(jax.tree.map(np.asarray, state_lib.index(state.batch_stats,
                                                              m.realization)))
        if graphdef is None:
            graphdef = exp.graphdef
        shapes = jax.tree.map(np.shape, (params[-1], stats[-1]))
        expected = jax.tree.map(np.shape, (params[0], stats[0]))
        if shapes != expected:
            raise DeckError(f"deck member {m.label}: its parameters do not have the shapes "
                            f"of {members[0].label}'s")
    stack = lambda trees: jax.tree.map(lambda *xs: np.stack(xs), *trees)  # noqa: E731
    return graphdef, stack(params), stack(stats)

"""What a site and the aggregator exchange: tensor names, record keys, config keys, seeds.

Both sides of the federation import their vocabulary from here, so a renamed key cannot drift
between the site's app and the aggregator's. Keys are snake_case except where Flower mandates a
name (``num-examples``) or where the key comes from Flower's ``--node-config`` / ``--run-config``
flags, whose convention is kebab-case. Pure Python/torch: no flwr import (a test checks this).

The exchanged state is a flat ``dict[str, Tensor]`` of float32 tensors:
``student.<name>`` and ``teacher.<name>`` (MiT + DINO head of each network) and ``center``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the model package imports torch; this module stays light (``site start``)
    from fed_unimiss.models.classify import TensorClass

__all__ = [
    "STUDENT_PREFIX",
    "TEACHER_PREFIX",
    "CENTER_KEY",
    "classify_exchange_keys",
    "is_valid_site_name",
    "class_weight",
    "site_seed",
]

# ---------------------------------------------------------------- exchanged tensors
STUDENT_PREFIX = "student."
TEACHER_PREFIX = "teacher."
CENTER_KEY = "center"

# ---------------------------------------------------------------- message records
# RecordDict keys of both directions. A train/evaluate instruction carries ARRAYS (global state)
# and CONFIG; a train reply carries ARRAYS (new state), METRICS and, optionally, SITE (a
# ConfigRecord holding only the site's self-declared label, see SITE_NAME_KEY).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
SCALES = "scales"  # a q8_delta reply's per-block float32 scales (keys: the tensor names)

# ---------------------------------------------------------------- instruction config keys
RECIPE_JSON = "recipe_json"  # the resolved Recipe as JSON: every site trains the same recipe
ROUND = "round"  # 1-based round number
NUM_ROUNDS = "num_rounds"
LOCAL_STEPS = "local_steps"  # optimiser steps per site per round
START_STEP = "start_step"  # global step of the round's first local step: (round-1)*local_steps
TOTAL_STEPS = "total_steps"  # rounds * local_steps: the length of every schedule
EVAL_BATCHES = "eval_batches"
# The round's exchange codecs (fed_unimiss.exchange_codec): every site must honour them or refuse.
EXCHANGE_DOWN = "exchange_down"
EXCHANGE_UP = "exchange_up"
EXCHANGE_TEACHER = "exchange_teacher"
# JSON [[name, shape], ...] of a packed (compressed) payload: the order of its tensors.
EXCHANGE_LAYOUT = "exchange_layout_json"
# down=q8_delta: the digest of the base a site holds after this message, and (delta messages
# only) the digest of the base the delta applies to (fed_unimiss/exchange_codec.py).
EXCHANGE_BASE = "exchange_base"
EXCHANGE_BASE_PREV = "exchange_base_prev"
EXCHANGE_BASE_CODEC = "exchange_base_codec"  # a full base: bf16 (the first) or fp32
# The coordinator's decision on this node's previous train reply, for this node only: in its next
# train instruction, or in the run's last message (type QUERY) when the run ends. The reason is
# the aggregator's check with this site's own numbers and the run's public bounds, never another
# site's label or numbers.
VERDICT_ROUND = "verdict_round"
VERDICT_ACTION = "verdict_action"  # accepted | clipped | rejected | refused
VERDICT_REASON = "verdict_reason"

# ---------------------------------------------------------------- reply metric keys
NUM_EXAMPLES = "num-examples"  # Flower's conventional name: samples_2d + samples_3d
SAMPLES_2D = "samples_2d"  # 2D samples trained on, X-rays and CT slices alike
SAMPLES_3D = "samples_3d"  # 3D sub-volumes trained on
STEPS = "steps"
LOSS = "loss"
LOSS_2D = "loss_2d"  # mean loss of the round's X-ray (2D) steps; absent without such steps
LOSS_3D = "loss_3d"  # mean loss of the round's CT (3D) steps
SECONDS = "seconds"
SAMPLES_PER_S = "samples_per_s"
SKIPPED = "skipped"
TEACHER_ENTROPY = "teacher_entropy"
KL = "kl"
TRAIN_METRICS = (STEPS, LOSS, LOSS_2D, LOSS_3D, SECONDS, SAMPLES_PER_S, SKIPPED, TEACHER_ENTROPY, KL)
COUNT_METRICS = (SAMPLES_2D, SAMPLES_3D, NUM_EXAMPLES)

# ---------------------------------------------------------------- probe of the global model
# A train instruction with PROBE true asks a site that holds a labelled probe set (``probe:``
# in site.yaml) to probe the global teacher and student it received, before training. The reply
# then carries, next to its training metrics, only numbers under these keys: balanced
# accuracies in [0, 1] (probe_key) and how many probe items were scored and how long it took.
PROBE = "probe"
PROBE_ITEMS = "probe_items"
PROBE_SECONDS = "probe_seconds"
PROBE_NETWORKS = ("teacher", "student")
PROBE_KINDS = ("knn", "linear")
PROBE_KEY = re.compile(r"^probe_(teacher|student)_stage([1-9])_(knn|linear)$")


def probe_key(network: str, stage: int, kind: str) -> str:
    """``probe_teacher_stage4_knn``: one balanced accuracy of a site's probe (stage 1-based)."""
    return f"probe_{network}_stage{stage}_{kind}"


# ---------------------------------------------------------------- error replies
# A site's error reply carries one of these codes and a fixed text (nothing site-specific),
# prefixed with ERROR_SITE_PREFIX + its label so the coordinator can name it. The coordinator
# shows the code's category below, never a site's text.
ERROR_SITE_PREFIX = "site="
ERROR_RECIPE = 5104  # this site's settings (e.g. DP) cannot train the federation's recipe
ERROR_SECURE = 5006  # the site refused or could not run a stage of a secure round
ERROR_CATEGORIES: dict[int, str] = {
    5001: "training failed at the site (see the site's log)",
    5002: "evaluation failed at the site",
    5101: "the site's privacy ledger is unreadable",
    5102: "a DP site declines evaluation",
    5103: "the federation requires DP and the site has none",
    5003: "the site cannot honour the announced exchange codec (see the site's log)",
    5004: "the site's worker stopped during the round (it is restarted)",
    ERROR_SECURE: "the site refused or could not run a secure-aggregation stage (a key that its "
                  "roster does not verify, a lost round, no identity key; see the site's log)",
    ERROR_RECIPE: "the site's DP settings cannot train this federation's recipe (it needs a "
                  "DP-capable federation config, e.g. configs/federation/micro-dp.yaml)",
    5105: "the site's DP settings do not fit the federation's announced DP plan (it refused "
          "before training; no budget spent; its terminal names the values)",
}


def error_category(code: int) -> str:
    """The public category of a site's error code (what the coordinator may print)."""
    return ERROR_CATEGORIES.get(int(code), "error at the site")


def error_reason(site_name: str | None, text: str) -> str:
    """An error reply's text: the site's label (if valid) and a fixed text."""
    return f"{ERROR_SITE_PREFIX}{site_name}; {text}" if is_valid_site_name(site_name) else text


def error_site(reason: object) -> str | None:
    """The valid site label at the start of an error reply's text, or None."""
    if not isinstance(reason, str) or not reason.startswith(ERROR_SITE_PREFIX):
        return None
    name = reason[len(ERROR_SITE_PREFIX):].split(";", 1)[0]
    return name if is_valid_site_name(name) else None


# The only non-numeric value a site may send: its label, chosen by hospital IT in the node
# config (e.g. "A"). It is not patient data; it makes logs and rounds.jsonl readable.
SITE_NAME_KEY = "site_name"
MAX_SITE_NAME_LEN = 64

# ---------------------------------------------------------------- node config (SuperNode)
NODE_DATA_PATH = "data-path"  # the site's image folder
NODE_STATE_DIR = "state-dir"  # site-local state: data cache, schedule position, ledger
NODE_SITE_NAME = "site-name"  # optional label, see SITE_NAME_KEY
# The site's hardware (fed_unimiss.runtime.Runtime); site-local, never sent to the aggregator.
NODE_DEVICE = "device"        # auto | cpu | cuda | cuda:N | mps
NODE_PRECISION = "precision"  # fp32 | bf16 | fp16
NODE_WORKERS = "workers"      # data-parallel processes per round
NODE_WORKER_SOCKET = "worker-socket"  # the socket of the site's warm worker process, if any
# The site's labelled probe set (site.yaml ``probe:``): folder, task, optional ProbeConfig YAML.
NODE_PROBE_DATA = "probe-data"
NODE_PROBE_TASK = "probe-task"
NODE_PROBE_CONFIG = "probe-config"
# Secure aggregation (exchange.up: secure): the site's identity private key (its kit's site.key)
# and the roster folder of every site's public key (its kit's roster/); both stay at the site.
NODE_IDENTITY_KEY = "identity-key"
NODE_ROSTER = "roster"


def probe_node_config(folder: str | Path, task: str = "seg3d", config: str | Path | None = None
                      ) -> dict[str, str]:
    """The probe-* node config of a site holding the labelled probe set ``folder``."""
    out = {NODE_PROBE_DATA: str(Path(folder).resolve()), NODE_PROBE_TASK: str(task)}
    if config is not None:
        out[NODE_PROBE_CONFIG] = str(Path(config).resolve())
    return out


# ---------------------------------------------------------------- run config (ServerApp)
RUN_CONFIG = "config"  # absolute path of the federation YAML (read at the coordinator)
RUN_OUT = "out"  # absolute RUN directory: checkpoints and rounds.jsonl
RUN_ROUNDS = "rounds"
RUN_RESUME = "resume"  # bool: continue after the last complete round in RUN
# Comma-separated labels of the sites the coordinator registered (its kit): a round names those
# it heard nothing from ("absent"). Optional; not part of the run's identity (sites may be added).
RUN_SITES = "sites"
# Absolute folder of every site's identity public key (<site>.pub; the coordinator kit's
# roster/): what exchange.up: secure plans its rounds with. Required in secure mode only.
RUN_ROSTER = "roster"

# ---------------------------------------------------------------- message types
TRAIN = "train"
EVALUATE = "evaluate"
QUERY = "query"  # the run's last message to a site: the decision on its last reply
# The stages of a secure round after its train instruction (Flower's custom action of train).
SECURE_STAGE = "train.secure"


_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_valid_site_name(name: object) -> bool:
    """A label both sides accept: a plain identifier (letters, digits, ``_.-``), <= 64 chars.

    Anything else (a path, free text) is neither sent by a site nor shown by the aggregator.
    """
    return isinstance(name, str) and len(name) <= MAX_SITE_NAME_LEN and bool(_SITE_NAME.match(name))


def _strip_prefix(name: str) -> str | None:
    for prefix in (STUDENT_PREFIX, TEACHER_PREFIX):
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def classify_exchange_keys(names: Iterable[str]) -> dict[str, TensorClass]:
    """Map each exchanged tensor name to ``2d``, ``3d`` or ``shared``.

    Student and teacher tensors are classified by the model's own naming rule
    (:func:`fed_unimiss.models.dimension_of`) on the name after the prefix; the DINO
    ``center`` is shared because 2D, 3D and slice outputs all update it. Any other name is an
    error: the aggregator must know how to average every tensor it receives.
    """
    from fed_unimiss.models.classify import SHARED, dimension_of

    classes: dict[str, TensorClass] = {}
    for name in names:
        if name == CENTER_KEY:
            classes[name] = SHARED
            continue
        stripped = _strip_prefix(name)
        if stripped is None:
            raise ValueError(
                f"exchanged tensor {name!r}: expected a name starting with {STUDENT_PREFIX!r} "
                f"or {TEACHER_PREFIX!r}, or {CENTER_KEY!r}"
            )
        classes[name] = dimension_of(stripped)
    return classes


def class_weight(tensor_class: str, samples_2d: float, samples_3d: float) -> float:
    """The weight of one site's reply for a tensor of ``tensor_class``.

    3D tensors learn only from 3D sub-volumes, 2D tensors from X-rays and CT slices (counted in
    ``samples_2d``), shared tensors from everything. The classes are those of
    :mod:`fed_unimiss.models.classify`.
    """
    from fed_unimiss.models.classify import DIM_2D, DIM_3D, SHARED

    if tensor_class == DIM_3D:
        return float(samples_3d)
    if tensor_class == DIM_2D:
        return float(samples_2d)
    if tensor_class == SHARED:
        return float(samples_2d) + float(samples_3d)
    raise ValueError(f"unknown tensor class {tensor_class!r}; expected '2d', '3d' or 'shared'")


def site_seed(recipe_seed: int, round_num: int, site_label: str) -> int:
    """A seed for one site's local training in one round, stable across processes and runs.

    Derived with SHA-256 (not Python's salted ``hash``) so a resumed run draws the same views
    as an uninterrupted one.
    """
    digest = hashlib.sha256(f"{recipe_seed}:{round_num}:{site_label}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


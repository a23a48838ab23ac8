"""Shared test fixtures (the real CT/X-ray samples, the repository paths) and the suite's set-up
for running on several pytest-xdist workers (`-n 3 --dist loadgroup` in pyproject.toml)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

# Three workers share two cores, and the CLIs the tests start train with the thread count of
# their config (2 in the micro configs). OpenMP threads that spin while they wait for each other
# then burn the cores the other workers need: a seg3d-micro fine-tune under that load took 31
# CPU-s spinning and 17 CPU-s sleeping, with the same results. Set before torch is imported, and
# inherited by every process a test starts; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FETCH_SCRIPT = SHARED / "data" / "fetch-real-samples.sh"
SAMPLES_CACHE = Path(os.environ.get("FED_UNIMISS_SAMPLES", REPO / ".cache" / "real-samples"))


@pytest.fixture(scope="session")
def real_samples() -> Path:
    """The real CT samples (sinus DICOM series, head NIfTI, MetaImage), fetched once into a cache.

    Skips, with the reason, only where the fetch script or apt (or root for it) is missing. Where
    they are present, a failed fetch is a test failure, never a silent skip.
    """
    if (SAMPLES_CACHE / ".complete").exists():
        return SAMPLES_CACHE
    SAMPLES_CACHE.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(SAMPLES_CACHE) + ".lock"):  # one fetch, whichever worker asks first
        return _fetch_real_samples()


def _fetch_real_samples() -> Path:
    if (SAMPLES_CACHE / ".complete").exists():  # fetched by another worker while we waited
        return SAMPLES_CACHE
    if not FETCH_SCRIPT.exists():
        pytest.skip(f"real samples unavailable: {FETCH_SCRIPT} does not exist")
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("real samples unavailable: apt-get/dpkg-deb not on this machine")
    if os.geteuid() != 0:
        pytest.skip("real samples unavailable: fetch-real-samples.sh needs root for apt")
    proc = subprocess.run(
        ["bash", str(FETCH_SCRIPT), str(SAMPLES_CACHE)], capture_output=True, text=True,
        timeout=600,
    )
    if proc.returncode != 0 or not (SAMPLES_CACHE / ".complete").exists():
        pytest.fail(f"fetch-real-samples.sh failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return SAMPLES_CACHE


@pytest.fixture(scope="session")
def real_xray() -> Path:
    """The real chest radiograph RG1_UNCR.dcm (CR, MONOCHROME1) from the pydicom-data package."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.fail("pydicom-data does not provide RG1_UNCR.dcm (is pydicom-data installed?)")
    return Path(path)


# ------------------------------------------------------------------ running on xdist workers

# Fixtures of session scope that cost a whole run to build: the tests that use one run on the same
# worker, so that it is built once (the cheap ones, such as phantom folders, are built per worker).
SHARED_SESSION_FIXTURES = {"finished_run"}


def _worker_count() -> int:
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def pytest_configure(config: pytest.Config) -> None:
    """On an xdist worker, give torch this worker's share of the cores (1 on 2 cores with -n 2 or more).

    Without it each worker runs torch on every core and the workers wait on each other's threads.
    The trainers set the thread count from their config (2 in several test configs), so the cap
    is kept over later calls too; a test's assertions hold at 1 thread and at 2.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    share = max(1, (os.cpu_count() or 1) // _worker_count())
    set_threads = torch.set_num_threads

    def capped(n: int) -> None:
        set_threads(min(int(n), share))

    torch.set_num_threads = capped
    set_threads(min(torch.get_num_threads(), share))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the tests that share an expensive set-up into one xdist group (``--dist loadgroup``),
    and on xdist workers hand out the longest work first.

    A module-scoped fixture (or a session-scoped one defined in the test module) is built once per
    worker that runs a test of its module, so such a module's tests stay on one worker; so do the
    users of each fixture in SHARED_SESSION_FIXTURES. Every other test goes to whichever worker
    is free. The scheduler deals work out in collection order (``--no-loadscope-reorder``): the
    longest first, so that the quick tests fill the gaps at the end instead of one worker
    finishing a long test alone.
    """
    for item in items:
        group = _shared_setup(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    if "PYTEST_XDIST_WORKER" in os.environ:
        items.sort(key=_dealing_order)  # stable: the order within a module is kept


# The longest work, in the order it is dealt (``--durations`` of a whole suite on 3 workers on 2
# cores): tests that mostly wait on processes and deadlines (W) alternate with tests that train
# (C), so that while one worker waits the others compute. A test id, or a module for all of its
# tests; after these come the other slow tests, then the rest.
DEALING_ORDER = (
    "tests/deploy/test_site_lifecycle.py",  # W, three runs on one site (~190 s)
    "tests/ssl/test_micro_recipe.py",  # C, the 600-step recipe (~160 s)
    "tests/finetune/test_flips.py",  # C (~125 s)
    "tests/finetune/test_overfit.py::test_seg3d",  # C (~135 s)
    "tests/deploy/test_deploy_e2e.py::test_tls",  # W (~120 s)
    "tests/core/test_researcher_guide.py",  # C (~100 s)
    "tests/finetune/test_overfit.py::test_seg2d",  # C (~100 s)
    "tests/deploy/test_deploy_e2e.py::test_aggregator_killed",  # W (~100 s)
    "tests/federation/test_attacks.py",  # C
    "tests/core/test_packaging.py",  # W, a pip install (~120 s)
    "tests/federation/test_exchange.py::test_attacks",  # C
    "tests/deploy/test_guide_walk.py",  # W (~100 s)
    "tests/deploy/test_deploy_e2e.py",  # W, the rest of the module
    "tests/ssl/test_data_parallel.py",  # C
    "tests/dashboard/test_dashboard_deploy.py",  # W
)


def _dealing_order(item: pytest.Item) -> tuple[int, int]:
    for i, prefix in enumerate(DEALING_ORDER):
        if item.nodeid.startswith(prefix):
            return 0, i
    return (1 if item.get_closest_marker("slow") is not None else 2), 0


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


def _shared_setup(item: pytest.Item) -> str | None:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    module = _module(item)
    for name in item.fixturenames:
        if name in SHARED_SESSION_FIXTURES:
            return name
        defs = info.name2fixturedefs.get(name)
        if not defs:
            continue
        fixture = defs[-1]
        if fixture.scope == "module" or (fixture.scope == "session" and fixture.baseid == module):
            return module
    return None

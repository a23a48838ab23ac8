"""Patient-level Poisson sampling: the unit of privacy is the patient, not the image.

A site may hold several series per patient (a CT and its follow-up, several X-rays). DP-SGD's
guarantee is about one *row* of the per-sample gradient; if a patient's images were separate rows,
a patient with k images would have k times the sensitivity. So each step:

1. every patient is included independently with probability ``sample_rate`` (Poisson sampling,
   the sampling Opacus's accountant analyses; the batch size varies and may be 0);
2. each included patient contributes exactly one item, drawn uniformly from that patient's items
   of the step's kind (2D or 3D); a patient without such items contributes nothing this step;
3. the trainer turns one patient's item (both views, and for CT its slices) into ONE gradient row,
   which is clipped to ``max_grad_norm``.

Sensitivity: adding or removing one patient changes the sum of clipped rows by at most
``max_grad_norm`` in L2, whatever the number of images the patient has. Patients are identified by
the site-local ``patient_key`` (a salted hash of the DICOM PatientID made by the data package);
the keys stay at the site, only their positions are used here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["PatientPoissonSampler", "sample_rate_for"]


def sample_rate_for(patients_per_step: float, num_patients: int) -> float:
    """Poisson rate q giving ``patients_per_step`` expected patients (capped at 1)."""
    if num_patients < 1:
        raise ValueError("no patients at this site: DP training needs at least one patient")
    return min(1.0, float(patients_per_step) / num_patients)


@dataclass(frozen=True)
class _Patient:
    items_by_kind: dict[str, tuple[int, ...]]


class PatientPoissonSampler:
    """Draws, per step, a Poisson sample of patients and one item index per sampled patient.

    Args:
        groups_by_kind: for each kind of data ("2d", "3d"), the patient key of every item of
            that kind's dataset, in dataset order (``dataset.groups()``). Returned indices are
            positions in that kind's dataset.
        sample_rate: the per-patient inclusion probability q (the accountant's sample rate).
    """

    def __init__(self, groups_by_kind: Mapping[str, Sequence[str]], sample_rate: float) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        by_patient: dict[str, dict[str, list[int]]] = {}
        for kind, groups in groups_by_kind.items():
            for i, key in enumerate(groups):
                by_patient.setdefault(str(key), {}).setdefault(kind, []).append(i)
        if not by_patient:
            raise ValueError("no items to sample from: DP training needs at least one patient")
        # Sorted keys: the patient order (and so every draw) does not depend on the file order.
        self._patients = [
            _Patient({k: tuple(v) for k, v in by_patient[key].items()})
            for key in sorted(by_patient)
        ]
        self.sample_rate = float(sample_rate)

    @property
    def num_patients(self) -> int:
        return len(self._patients)

    def patients_with(self, kind: str) -> int:
        """How many patients have at least one item of ``kind``."""
        return sum(1 for p in self._patients if kind in p.items_by_kind)

    def sample(self, kind: str, generator: torch.Generator) -> list[int]:
        """Item indices of one step: one per Poisson-sampled patient having items of ``kind``.

        Every patient is drawn (with the same probability) whether or not it has items of
        ``kind``, so the rate the accountant sees is exactly ``sample_rate`` for every patient.
        """
        included = torch.rand(self.num_patients, generator=generator) < self.sample_rate
        picks: list[int] = []
        for patient, chosen in zip(self._patients, included.tolist(), strict=True):
            items = patient.items_by_kind.get(kind)
            if not chosen or not items:
                continue
            j = int(torch.randint(len(items), (1,), generator=generator).item())
            picks.append(items[j])
        return picks

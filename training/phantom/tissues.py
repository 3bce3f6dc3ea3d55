"""The phantom's tissues: finer than the six label classes, each with its class and its CT numbers.

A tissue code is what the painter writes into the supersampled map. Each tissue belongs to
one label class (classes.py) and has a mean HU that depends on the subject (fat attenuation
with tube voltage, muscle with myosteatosis, bone with age) and on the contrast phase, plus
a texture amplitude (HU) for the smooth in-tissue variation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

# label classes (classes.py)
BG, MUS, IMAT, SAT, VAT, MSC = range(6)


@dataclass(frozen=True)
class Tissue:
    code: int
    key: str
    label: int           # label class index 0..5
    texture_hu: float    # SD of the smooth in-tissue variation (HU)


_TABLE = (
    # code, key, class, texture SD (HU)
    (0, "air", BG, 0.0),
    (1, "table_shell", BG, 25.0),
    (2, "table_core", BG, 10.0),
    (3, "pad", BG, 15.0),
    (4, "skin", MSC, 6.0),
    (5, "sat", SAT, 8.0),
    (6, "scarpa", SAT, 4.0),          # superficial fascia: a fibrous sheet inside SAT
    (7, "vat", VAT, 9.0),
    (8, "muscle", MUS, 7.0),
    (9, "imat", IMAT, 7.0),
    (10, "cortex", MSC, 90.0),
    (11, "marrow", MSC, 45.0),
    (12, "disc", MSC, 8.0),
    (13, "csf", MSC, 5.0),
    (14, "kidney_cortex", MSC, 8.0),
    (15, "kidney_medulla", MSC, 8.0),
    (16, "urine", MSC, 3.0),
    (17, "liver", MSC, 6.0),
    (18, "spleen", MSC, 6.0),
    (19, "aorta", MSC, 6.0),
    (20, "ivc", MSC, 8.0),
    (21, "vessel", MSC, 10.0),
    (22, "bowel_wall", MSC, 8.0),
    (23, "bowel_fluid", MSC, 6.0),
    (24, "oral_contrast", MSC, 25.0),
    (25, "gas", MSC, 15.0),
    (26, "stool", MSC, 90.0),
    (27, "bile", MSC, 4.0),
    (28, "calcification", MSC, 80.0),
    (29, "fascia", MSC, 6.0),         # linea alba and other dense fibrous bands
    # the upper abdomen and lower chest (anatomy="torso", torso.py)
    (30, "lung", MSC, 30.0),          # lung bases in the costophrenic recesses
    (31, "diaphragm", MSC, 7.0),      # diaphragm and its crura: muscle HU, not skeletal muscle
    (32, "cartilage", MSC, 14.0),     # costal cartilage
    (33, "portal_vein", MSC, 8.0),    # portal vein and its branches, splenic vein
    (34, "hepatic_vein", MSC, 8.0),
    (35, "gastric", MSC, 22.0),       # stomach contents: food and fluid
    (36, "fat_pad", VAT, 9.0),        # visceral fat kept around organs (perirenal, periaortic)
    (37, "adrenal", MSC, 6.0),
    (38, "pancreas", MSC, 12.0),
)

TISSUES: Tuple[Tissue, ...] = tuple(Tissue(*row) for row in _TABLE)
CODE: Dict[str, int] = {t.key: t.code for t in TISSUES}
N_TISSUES = len(TISSUES)

#: tissue code -> label class
CLASS_OF = np.array([t.label for t in TISSUES], np.uint8)
#: tissue code -> texture SD (HU)
TEXTURE_HU = np.array([t.texture_hu for t in TISSUES], np.float32)

PHASES = ("non_contrast", "arterial", "portal_venous", "delayed")


def mean_hu(subject) -> np.ndarray:
    """Mean HU of every tissue code for one subject: float32 (N_TISSUES,).

    subject: a Subject (subject.py); uses kvp, phase, fat/muscle/bone parameters.
    Enhancement values are for 120 kVp and scale with (120 / kVp) ** 1.3 at lower voltage.
    """
    s = subject
    iodine = (120.0 / s.kvp) ** 1.3
    # contrast enhancement (HU above the unenhanced value) per phase
    enh = {
        "non_contrast": dict(aorta=0, ivc=0, vessel=0, kid_c=0, kid_m=0, urine=0, liver=0,
                             spleen=0, wall=0, muscle=0, portal=0, hepatic=0, pancreas=0,
                             adrenal=0),
        "arterial": dict(aorta=260, ivc=35, vessel=150, kid_c=150, kid_m=45, urine=0, liver=20,
                         spleen=60, wall=35, muscle=3, portal=60, hepatic=10, pancreas=90,
                         adrenal=45),
        "portal_venous": dict(aorta=130, ivc=115, vessel=120, kid_c=120, kid_m=115, urine=0,
                              liver=55, spleen=65, wall=40, muscle=5, portal=150,
                              hepatic=120, pancreas=65, adrenal=45),
        "delayed": dict(aorta=65, ivc=65, vessel=60, kid_c=75, kid_m=85, urine=500, liver=35,
                        spleen=35, wall=20, muscle=3, portal=75, hepatic=70, pancreas=35,
                        adrenal=25),
    }[s.phase]
    e = {k: v * iodine * s.enhancement for k, v in enh.items()}
    hu = np.zeros(N_TISSUES, np.float32)

    def put(key, value):
        hu[CODE[key]] = value

    put("air", -1000.0)
    put("table_shell", s.table_hu)
    put("table_core", -960.0)
    put("pad", -880.0)
    put("skin", 35.0 + e["muscle"])
    put("sat", s.fat_hu)
    put("scarpa", s.fat_hu + 50.0)
    put("vat", s.fat_hu + s.vat_offset_hu)
    put("muscle", s.muscle_hu + e["muscle"])
    put("imat", s.fat_hu + 8.0)
    put("cortex", s.cortex_hu)
    put("marrow", s.marrow_hu)
    put("disc", 85.0)
    put("csf", 10.0)
    put("kidney_cortex", 32.0 + e["kid_c"])
    put("kidney_medulla", 30.0 + e["kid_m"])
    put("urine", 8.0 + e["urine"])
    put("liver", s.liver_hu + e["liver"])
    put("spleen", 45.0 + e["spleen"])
    put("aorta", 42.0 + e["aorta"])
    put("ivc", 40.0 + e["ivc"])
    put("vessel", 40.0 + e["vessel"])
    put("bowel_wall", 38.0 + e["wall"])
    put("bowel_fluid", 12.0)
    put("oral_contrast", s.oral_contrast_hu)
    put("gas", -990.0)
    put("stool", -60.0)
    put("bile", 8.0)
    put("calcification", 750.0)
    put("fascia", 55.0 + e["muscle"])
    put("lung", -855.0)
    put("diaphragm", max(s.muscle_hu, 38.0) + e["muscle"])
    put("cartilage", 105.0 + 1.2 * max(0.0, s.age - 40.0))
    put("portal_vein", 40.0 + e["portal"])
    put("hepatic_vein", 40.0 + e["hepatic"])
    put("gastric", 18.0)
    put("fat_pad", s.fat_hu + s.vat_offset_hu)
    put("adrenal", 28.0 + e["adrenal"])
    put("pancreas", 44.0 - 0.25 * max(0.0, s.age - 40.0) + e["pancreas"])
    return hu

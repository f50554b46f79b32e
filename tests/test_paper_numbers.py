"""The paper's numbers in evaluate/paper.py, checked against the paper's own text (../shared/seeds), not restated."""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rebeca_utils.evaluate.paper import PAPER_TABLE1, PAPER_TABLE2, TABLE2_COLUMNS, table1, table2

PAPER = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "000_24ebf48da1458c42.txt"
pytestmark = pytest.mark.skipif(not PAPER.is_file(), reason=f"the paper's text {PAPER} is not beside the checkout")


def _block(start: str, stop: str) -> list[list[str]]:
    """Tab-separated rows of the paper's text between a line starting with `start` and one starting with `stop`."""
    lines = PAPER.read_text().splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(start))
    j = next(n for n in range(i + 1, len(lines)) if lines[n].startswith(stop))
    return [re.sub(r"</?u>", "", line).split("\t") for line in lines[i + 1 : j] if "\t" in line]


def paper_table1() -> dict:
    """(method, k) -> (precision, recall) as printed in Table 1 (recall x 1e-3 there)."""
    out, method = {}, None
    for cells in _block("Method\tk\tPrecision", "Figure 3"):
        method = cells[0].replace(" (deterministic)", "") or method
        out[(method, int(cells[1]))] = (float(cells[2]), float(cells[3]) * 1e-3)
    return out


def paper_table2() -> dict:
    """row name -> the six numbers of Table 2 (@1 P, R, F1, @5 P, R, F1)."""
    return {c[0]: tuple(float(v) for v in c[1:7]) for c in _block("Model\t@1", "Table 2:") if c[0] != ""}


def test_table1_constants_are_the_papers():
    printed = paper_table1()
    assert set(printed) == set(PAPER_TABLE1) and len(printed) == 9
    for key, (p, r) in printed.items():
        assert PAPER_TABLE1[key] == pytest.approx((p, r), abs=1e-12), key


def test_table2_constants_are_the_papers():
    printed = paper_table2()
    assert printed == PAPER_TABLE2 and len(printed) == 8


def test_tables_put_the_papers_numbers_beside_ours():
    rng = np.random.default_rng(0)
    pool, likes = rng.normal(size=(40, 4)).astype(np.float32), rng.random((4, 40)) < 0.5
    samples = rng.normal(size=(2, 4, 20, 4)).astype(np.float32)
    t1 = table1(dict(test_latents=pool, test_likes=likes, rebeca=samples, random=samples, mean=pool[:4]))
    t1 = t1.set_index(["method", "k"])
    for (method, k), (p, r) in paper_table1().items():
        assert (t1.loc[(method, k), "paper_precision"], t1.loc[(method, k), "paper_recall"]) == pytest.approx((p, r))
    s = pd.DataFrame(dict(k=[1, 5], precision=[0.5, 0.4], recall=[0.2, 0.6], f1=[0.3, 0.5]))
    t2 = table2({"REBECA (CFG=5.0)": s}, with_paper=True)
    for name, values in paper_table2().items():
        got = [t2.loc[name, (f"@{k}", m, "paper")] for k, m in TABLE2_COLUMNS]
        assert got == pytest.approx(list(values)), name

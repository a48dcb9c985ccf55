"""Plot MedQM-D's quality map Q(D) with its readable anchor points → docs/img/quality_map.png."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medqm.label.quality import DEFAULT_MAP  # noqa: E402


def main(out: Path = Path("docs/img/quality_map.png")) -> None:
    d = np.linspace(-1.5, 3.5, 500)
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    ax.plot(d, DEFAULT_MAP(d), lw=2.2, color="#1f5fa8", label="Q = 1 / (1 + exp((D − ln 2) / s)),  s = ln 2 / ln 9")
    for ratio, label in ((1, "unchanged"), (2, "½ as likely"), (4, "¼ as likely"), (8, "⅛")):
        x = math.log(ratio)
        ax.plot([x], [DEFAULT_MAP(x)], "o", color="#c0392b")
        ax.annotate(f"{label}\nQ = {DEFAULT_MAP(x):.2f}", (x, DEFAULT_MAP(x)), textcoords="offset points",
                    xytext=(8, 6), fontsize=8)
    top = ax.secondary_xaxis("top", functions=(lambda x: np.exp(x), lambda r: np.log(np.clip(r, 1e-9, None))))
    top.set_xticks([0.25, 0.5, 1, 2, 4, 8, 16, 32])
    top.set_xticklabels(["¼", "½", "1", "2", "4", "8", "16", "32"])
    top.set_xlabel("the correct answer became this many times less likely (exp D)")
    ax.set_xlabel("diagnostic loss D = mean_j [NLL_j(distorted) − NLL_j(reference)]  (nats)")
    ax.set_ylabel("quality Q")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

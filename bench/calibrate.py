"""Predicted against measured, per layer pass: the calibration record of `pyalexnet profile`'s model.

    python bench/calibrate.py --profile PROFILE.json --bench BENCH.json [--out CALIBRATION.json]

PROFILE.json is what `pyalexnet profile --json` wrote (kind "predicted"), BENCH.json what `pyalexnet bench --json`
measured on a GPU (its per-layer forward and backward times, strict fp32; its whole training step). Rows pair
each layer's forward and backward (the backward is the profile's data and filter gradients together, as bench
times them together); measured / predicted above 1 means the model is optimistic. bench/gpu_check.sh runs this
after its bench and profile stages; bench/results_md.py renders the result in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def calibrate(predicted: dict, measured: dict) -> dict:
    from pyalexnet.model import layer_labels, layer_specs

    if predicted.get("kind") != "predicted":
        raise ValueError("--profile: not a `pyalexnet profile` result (kind must be 'predicted')")
    variant, batch = predicted["variant"], predicted["batch"]
    labels = layer_labels(layer_specs(variant))
    pred = {}
    for r in predicted["passes"]:
        direction = "forward" if r["pass"] == "forward" else "backward"
        pred[(r["layer"], direction)] = pred.get((r["layer"], direction), 0.0) + r["ms"]
    batches = {w["batch"] for w in measured.get("whole_network", [])}
    if batches and batches != {batch}:
        raise ValueError(f"--bench measured batch {sorted(batches)}, the profile predicted batch {batch}")
    rows = []
    for m in measured.get("layers", []):
        if m.get("variant") != variant:
            continue
        label = labels[m["layer"]]
        for direction in ("forward", "backward"):
            p, ms = pred.get((label, direction)), m.get(f"{direction}_ms")
            if p is None or ms is None:
                continue
            rows.append({"layer": label, "direction": direction, "predicted_ms": p, "measured_ms": ms,
                         "measured_over_predicted": ms / p})
    step = next((w for w in measured.get("whole_network", []) if w["variant"] == variant and w["batch"] == batch
                 and w["mode"] == "strict"), None)
    return {"bench": "calibration", "kind": "calibration", "card": measured.get("card"), "date": measured.get("date"),
            "commit": measured.get("commit"), "predicted_commit": predicted.get("commit"),
            "predicted_card": predicted.get("card"), "variant": variant, "batch": batch, "rows": rows,
            "step": None if step is None else {"predicted_ms": predicted["step_ms"], "measured_ms": step["ms"],
                                               "measured_over_predicted": step["ms"] / predicted["step_ms"]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, required=True)
    parser.add_argument("--bench", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="default: beside --bench, calibration.json")
    args = parser.parse_args()
    result = calibrate(json.loads(args.profile.read_text()), json.loads(args.bench.read_text()))
    out = args.out or args.bench.with_name("calibration.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    for r in result["rows"]:
        print(f"{r['layer']:<10} {r['direction']:<8} predicted {r['predicted_ms']:8.3f} ms  measured "
              f"{r['measured_ms']:8.3f} ms  x{r['measured_over_predicted']:.2f}")
    if result["step"]:
        s = result["step"]
        print(f"whole step: predicted {s['predicted_ms']:.2f} ms, measured {s['measured_ms']:.2f} ms "
              f"(x{s['measured_over_predicted']:.2f})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

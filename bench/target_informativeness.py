"""How map-specific are the stage-1 targets? (issue 21, section 3: measure before fixing.)

    python bench/target_informativeness.py                      # the seeing tiny base, levels 3-4 test maps
    python bench/target_informativeness.py --model M --levels 3 4 5 6

For every VSP test map of ``--levels`` the helper image is pooled into the stage-1 targets exactly as stage 1 does
(the model's image processor, then ``mirage_rl.latent.helper_targets``), under each target variant:

* ``average_k4`` (the paper's setting), ``grid_k4``, ``grid_k16``: the helper image (the shortest path drawn as red
  arrows) pooled by ``compress: average`` / ``grid`` into k vectors;
* ``residual_average_k4``, ``residual_grid_k16``: the same minus the input map's pooled features (only what the
  drawing adds remains; average pooling is linear, so this is the pooled feature difference);
* ``filled_average_k4``, ``filled_grid_k16``: the path's cells filled red instead of arrows (``render_helper(...,
  "filled")``, the ``helper: filled`` of build-data: a drawing that survives the resize).

Per variant (JSON, one object): ``pairwise_cos`` (mean cosine between different maps' targets, flattened over the k
slots: 1.0 = every map the same target), ``specific_share`` (sum ||t_i - mean t||^2 / sum ||t_i||^2: the share of
the targets' energy that is map-specific) and ``nn_same_plan`` (share of maps whose nearest other target has the same
shortest plan: whether the targets encode the answer). Speed is not the point; the numbers are.
"""

from __future__ import annotations

import argparse
import json

import torch
from mirage_rl import latent
from mirage_rl.modeling import load_model, load_processor
from mirage_rl.tasks.vsp_planning.maps import load_benchmark, render_helper, render_map, shortest_plan


def targets(model, processor, images, k, compress):
    px = processor.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    return latent.helper_targets(model, px["pixel_values"], px["image_grid_thw"], k, compress).float()


def stats(t: torch.Tensor, plans: list[tuple]) -> dict:
    flat = torch.nn.functional.normalize(t.flatten(1), dim=-1)
    sim = flat @ flat.T
    n = len(plans)
    off = ~torch.eye(n, dtype=torch.bool)
    sim_off = sim.masked_fill(~off, -2)
    nn = sim_off.argmax(1).tolist()
    centred = t - t.mean(0, keepdim=True)
    return {"pairwise_cos": round(float(sim[off].mean()), 4),
            "specific_share": round(float(centred.pow(2).sum() / t.pow(2).sum()), 4),
            "nn_same_plan": round(sum(plans[i] == plans[j] for i, j in enumerate(nn)) / n, 4)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="outputs/base/seeing-tiny")
    ap.add_argument("--benchmark_dir", default="../shared/data/vsp/maze_planning")
    ap.add_argument("--levels", type=int, nargs="+", default=[3, 4])
    a = ap.parse_args(argv)
    model, processor = load_model(a.model), load_processor(a.model)
    maps = load_benchmark(a.benchmark_dir, a.levels)
    plans = [tuple(shortest_plan(m.map_desc)) for m in maps]
    helpers = [render_helper(m.map_desc, list(p)) for m, p in zip(maps, plans)]
    inputs = [render_map(m.map_desc) for m in maps]
    fills = [render_helper(m.map_desc, list(p), "filled") for m, p in zip(maps, plans)]
    out = {"model": a.model, "levels": a.levels, "maps": len(maps), "variants": {}}
    with torch.no_grad():
        for name, imgs, k, compress, residual in [
            ("average_k4", helpers, 4, "average", False), ("grid_k4", helpers, 4, "grid", False),
            ("grid_k16", helpers, 16, "grid", False), ("residual_average_k4", helpers, 4, "average", True),
            ("residual_grid_k16", helpers, 16, "grid", True), ("filled_average_k4", fills, 4, "average", False), ("filled_grid_k16", fills, 16, "grid", False)]:
            t = torch.cat([targets(model, processor, imgs[i:i + 50], k, compress) for i in range(0, len(imgs), 50)])
            if residual:
                t = t - torch.cat([targets(model, processor, inputs[i:i + 50], k, compress)
                                   for i in range(0, len(inputs), 50)])
            out["variants"][name] = stats(t, plans)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

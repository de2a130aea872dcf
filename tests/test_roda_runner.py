

def test_versus_reference_counts_cells_above_and_below():
    import pandas as pd

    from lib.roda_runner import versus_reference

    rows = []
    for cond, pc, ours in (("noise", 0.5, 0.7), ("blur", 0.8, 0.6), ("contrast", 0.6, 0.61)):
        for seed, jitter in ((0, 0.0), (1, 0.02)):
            rows += [dict(task="t", condition=cond, method="patchcore", seed=seed, image_auroc=pc, pixel_auroc=pc),
                     dict(task="t", condition=cond, method="roda", seed=seed, image_auroc=ours + jitter,
                          pixel_auroc=ours - jitter)]
    out = versus_reference(pd.DataFrame(rows), margin=0.05).set_index("method").loc["roda"]
    assert out.cells == 3 and out.pixel_above == 1 and out.pixel_below == 1  # contrast is inside the margin
    assert abs(out.pixel_mean_diff - ((0.19 - 0.21 + 0.0) / 3)) < 1e-9

"""Tests of llamatool/plan.py."""

import llamatool as lt

from conftest import EIGHT_DEVICES


@EIGHT_DEVICES
def test_plan_on_eight_devices_and_bad_meshes_get_clear_errors(capsys):
    tiny = ["--dim", "32", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2",
            "--batch-size", "16", "--seq-len", "16", "--dtype", "float32", "--optimizer", "adamw"]
    assert lt.cli.main(["--plan", "--fsdp", "all", *tiny]) == 0
    out = capsys.readouterr().out
    config, tc = lt.configs.resolve_configs(lt.cli.build_parser().parse_args(tiny))
    weights = lt.plan.tree_bytes(lt.settings.param_shapes(config), lt.devices.state_shardings(lt.devices.make_mesh("all"),
                                                                      lt.settings.param_shapes(config)))
    assert "on 8 CPU devices as data 1 x fsdp 8: 32 per device" in out
    assert f"weights      {lt.plan.gb(weights):>10}" in out and f"AdamW        {lt.plan.gb(2 * weights):>10}" in out
    assert "XLA's memory analysis of the compiled step: arguments" in out and "fits: yes" in out
    loss = lt.speed.loss_buffer_bytes(config, 2 * 16)  # 2 rows of 16 tokens per device
    assert (f"loss         {lt.plan.gb(loss['blockwise']):>10}  (XLA's temporary buffers of the "
            f"blockwise cross-entropy and its gradient over 32 tokens; plain: "
            f"{lt.plan.gb(loss['plain'])})") in out
    assert "all-gather" in out and "reduce-scatter" in out
    # Each format's host memory per process: one process holds every shard.
    state = lt.plan.gb(3 * lt.plan.tree_bytes(lt.settings.param_shapes(config)))  # weights and AdamW's two moments
    assert "checkpoint (npz: --checkpoint auto: npz, one process)" in out
    assert f"  npz    host memory {state:>10}" in out and f"  orbax  host memory {state:>10}" in out
    assert lt.cli.main(["--fsdp", "3"]) == 2
    assert "--fsdp 3 does not divide the 8 devices: choose one of 1, 2, 4, 8 or all" in \
        capsys.readouterr().err
    assert lt.cli.main(["--batch-size", "12", "--plan"]) == 2
    assert "--batch-size 12 does not split over 8 device(s): use a multiple of 8" in \
        capsys.readouterr().err

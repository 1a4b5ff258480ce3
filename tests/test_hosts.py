"""Tests of llamatool/hosts.py."""

import dataclasses

import numpy as np
import pytest

import llamatool as lt

from conftest import HAS_ORBAX, start_two_processes, wait_for_line


@pytest.mark.slow
def test_two_processes_train_like_one_device_stop_together_and_resume_anywhere(corpus, tmp_path):
    import signal
    flags = ["--data", str(corpus), "--out-dir", "run", "--dim", "32", "--n-layers", "2",
             "--n-heads", "4", "--n-kv-heads", "2", "--steps", "200", "--batch-size", "8",
             "--seq-len", "16", "--eval-every", "2", "--log-every", "1", "--dtype",
             "float32", "--dropout", "0.1", "--tie-embeddings", "--max-new-tokens", "4"]
    procs = start_two_processes(flags, tmp_path)
    wait_for_line(tmp_path / "p0.log", "step     3/", procs)
    for p in procs:  # as SLURM does before preemption: SIGTERM to every process
        p.send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
    log0 = (tmp_path / "p0.log").read_text()
    assert codes == [130, 130], log0[-3000:] + (tmp_path / "p1.log").read_text()[-3000:]
    assert "8 CPU devices on 2 processes as data 8 x fsdp 1" in log0
    assert "eval  step     2 | train" in log0  # an evaluation of batches that span both
    assert "step     1/" not in (tmp_path / "p1.log").read_text()  # process 0 speaks for all
    # --checkpoint auto: with two processes, Orbax where it is installed, and
    # each process wrote its own shards (ocdbt.process_N); else the .npz.
    path = lt.checkpoint_formats.saved_checkpoint(tmp_path / "run")
    assert path.name == ("ckpt.orbax" if HAS_ORBAX else "ckpt.npz")
    saved = lt.checkpoint_formats.checkpoint_meta(path)
    stopped_at = saved["step"]
    if HAS_ORBAX:
        assert "--checkpoint auto: orbax" in log0
        assert {p.name for p in (path / str(stopped_at) / "state").glob("ocdbt.process_*")} == \
            {"ocdbt.process_0", "ocdbt.process_1"}
    assert stopped_at >= 3 and len(saved["history"]["train"]) == stopped_at
    # The same run on this process's one device, two steps further
    config, tc = lt.configs.resolve_configs(lt.cli.build_parser().parse_args(flags))

    def stop_at(step):
        def log(line):
            if line.startswith(f"step {step:5d}/"):
                raise KeyboardInterrupt
        return log

    reference = lt.training.train(config, tc, corpus, tmp_path / "reference", log=stop_at(stopped_at + 2))
    ref = np.array(reference["history"]["train"])
    np.testing.assert_allclose(saved["history"]["train"], ref[:stopped_at], atol=1e-5)
    # The two processes' checkpoint resumes on one device, exactly
    resumed = lt.training.train(config, dataclasses.replace(tc, steps=stopped_at + 2), corpus,
                      tmp_path / "run", resume=True, log=lambda s: None)
    np.testing.assert_allclose(resumed["history"]["train"], ref, atol=1e-5)

    # A process that dies: the other stops, naming it, instead of waiting forever
    # (JAX's coordination service ends it once the lost process has been
    # silent for --coordinator-timeout; our own message when a collective fails
    # first).
    # First it saves a .npz at step 2, process 0 gathering the FSDP shards that
    # process 1 holds (the path --checkpoint auto leaves when Orbax is absent).
    procs = start_two_processes([*flags[:3], "killed", *flags[4:], "--fsdp", "8",
                                 "--checkpoint", "npz"], tmp_path, timeout=5)
    wait_for_line(tmp_path / "p0.log", "step     3/", procs)
    procs[1].kill()
    assert procs[0].wait(timeout=60) != 0
    log0 = (tmp_path / "p0.log").read_text()
    assert "8 CPU devices on 2 processes as data 1 x fsdp 8" in log0
    assert ("lost contact with process 1" in log0
            or "tasks are unhealthy (stopped sending heartbeats):\n1\n" in log0), log0[-2000:]
    # The gathered .npz (step 2, or 4 if process 0 got there first) resumes on
    # one device, one step further, exactly: the gathered weights and moments
    # are the ones the two processes held, not only the right shapes.
    n = lt.checkpoint_formats.checkpoint_meta(tmp_path / "killed" / "ckpt.npz")["step"]
    assert n in (2, 4)
    resumed = lt.training.train(config, dataclasses.replace(tc, steps=n + 1), corpus, tmp_path / "killed",
                      resume=True, log=lambda s: None)
    np.testing.assert_allclose(resumed["history"]["train"], ref[:n + 1], atol=1e-5)

"""Files in a bucket (gs://...): every input a user names and every output is read and written
through epath, here onto a local folder standing in for the bucket (the `bucket` fixture)."""
import os

import numpy as np
import pytest
from etils import epath

from configs import shapes_sr, shapes_t2i
from ddpm_jax import cascading, checkpoints, chunk_store, files, generation, image_utils, parallel, sample
from ddpm_jax.evaluation import metrics, tasks
from ddpm_jax.validation import UserError, check_guide
from tests.cli_helpers import run_command
from tests.test_sample_cli import _config, _workdir


def test_npz_files_in_a_bucket(bucket):
    files.save_npz("gs://b/x/a", images=np.arange(6, dtype=np.uint8).reshape(1, 2, 3, 1))  # no '.npz' added
    assert os.path.isfile(bucket / "b/x/a")
    assert files.is_file("gs://b/x/a") and not files.is_file("gs://b/x") and not files.is_file("gs://b/none")
    np.testing.assert_array_equal(files.load_npz("gs://b/x/a", "--samples")["images"].ravel(), np.arange(6))
    (bucket / "b/x/text.npz").write_text("not a zip")
    with pytest.raises(UserError, match=r"--samples=gs://b/x/text.npz: not an .npz file"):
        files.load_npz("gs://b/x/text.npz", "--samples")
    with pytest.raises(UserError, match=r"--samples='gs://b/x/none.npz': no such file"):
        files.load_npz("gs://b/x/none.npz", "--samples")
    stats = metrics.save_statistics("gs://b/stats.npz", np.random.default_rng(0).normal(size=(20, 4)))
    np.testing.assert_allclose(metrics.load_statistics("gs://b/stats.npz")["sigma"], stats["sigma"])


def test_images_samples_and_prompts_in_a_bucket(bucket, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), np.uint8)
    for i, img in enumerate(images):
        image_utils.save_png(f"gs://b/in/{i}.png", img)
    (bucket / "b/in/notes.txt").write_text("not an image")  # skipped: not .png/.jpg
    np.testing.assert_array_equal(image_utils.load_images("gs://b/in/", channels=None), images)
    np.testing.assert_array_equal(image_utils.load_images("gs://b/in/1.png", channels=1), images[1:2])
    np.testing.assert_array_equal(tasks.load_samples("gs://b/in")[0], images)
    with pytest.raises(FileNotFoundError, match="gs://b/none.png: no such image file or folder"):
        image_utils.load_images("gs://b/none.png")
    (bucket / "b/prompts.txt").write_text("a red circle\n\n  a blue square \n")
    assert generation.read_prompts("gs://b/prompts.txt") == ["a red circle", "a blue square"]
    assert not os.path.exists(tmp_path / "gs:")


@pytest.mark.slow  # keeps the default suite near 10 min on 2 cores; `-m slow` runs it
def test_a_sample_command_edits_inputs_in_a_bucket_into_the_bucket(bucket, tmp_path):
    """`sample --init_images=gs://... --mask=gs://... --out=gs://...` writes what the same command
    with the files on local disk writes."""
    run = _workdir(tmp_path / "run", _config())
    inputs = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1), np.uint8)
    mask = np.zeros((8, 8, 1), np.uint8)
    mask[2:6, 2:6] = 255
    for root in ("gs://b", str(tmp_path / "local")):
        for i, img in enumerate(inputs):
            image_utils.save_png(f"{root}/in/{i}.png", img)
        image_utils.save_png(f"{root}/mask.png", mask)
    outs = []
    for root in ("gs://b", str(tmp_path / "local")):
        status, _, err = run_command(sample, f"--workdir={run}", f"--init_images={root}/in/", f"--mask={root}/mask.png",
                                     "--label=1", "--num_samples=2", f"--out={root}/out")
        assert status == 0, err
        outs.append(files.load_npz(f"{root}/out/samples.npz", "out"))
    assert sorted(os.listdir(bucket / "b/out")) == ["samples.npz", "samples.png"]  # partial/ cleared
    np.testing.assert_array_equal(outs[0]["arr_0"], outs[1]["arr_0"])
    kept = mask[..., 0] == 0  # black in the mask: the input, exactly
    np.testing.assert_array_equal(outs[0]["arr_0"][:, kept], inputs[:, kept])  # one edit per input
    assert not os.path.exists(tmp_path / "gs:") and not os.path.exists("gs:")


def test_cascade_stages_and_guides_in_a_bucket(bucket):
    """A cascade of runs in the bucket, each stage's checkpoint chosen by step, and an autoguide there."""
    checkpoints.write_config("gs://b/base", shapes_t2i.get_config())
    checkpoints.write_config("gs://b/sr", shapes_sr.get_config())
    for step in ("1000", "2000", "3000.orbax-checkpoint-tmp-7"):  # the last unfinished
        (bucket / "b/base/checkpoints" / step).mkdir(parents=True)
    stages = cascading.load_stages(["gs://b/base", "gs://b/sr"], checkpoint_steps=[1000, 0])
    assert [s.step for s in stages] == [1000, None]
    assert stages[1].config.model.low_res_size == shapes_sr.get_config().model.low_res_size
    with pytest.raises(UserError, match=r"stage 0 \(gs://b/base\) has no checkpoint of step 3000; it has steps "
                                        r"\[1000, 2000\]"):
        cascading.load_stages(["gs://b/base", "gs://b/sr"], checkpoint_steps=[3000, 0])
    with pytest.raises(UserError, match="gs://b/none is not a training run"):
        cascading.load_stages(["gs://b/none", "gs://b/sr"])
    config = shapes_t2i.get_config()
    config.sampling.guide_workdir, config.sampling.guide_checkpoint_step = "gs://b/base", 2000
    assert check_guide(config).model.ch == config.model.ch
    config.sampling.guide_checkpoint_step = 3000
    with pytest.raises(UserError, match="guide_checkpoint_step=3000"):
        check_guide(config)


def test_outputs_for_a_bucket_go_there_not_to_a_local_gs_folder(bucket, tmp_path, monkeypatch):
    """A gs:// --out or workdir: the sample files, an evaluation's result and the batches kept for a
    resume are written through epath, never into a folder named 'gs:' on the VM's disk, which goes
    with the VM."""
    monkeypatch.chdir(tmp_path)
    config = _config(num_classes=0)
    config.sampling.num_samples = 3
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), np.uint8)
    generation.write_outputs("gs://b/run/samples", images, generation.make_request(config), 0, individual=True)
    tasks.write_result("gs://b/run", "digits_x", {"digits_fd": 1.5})
    store = chunk_store.ChunkStore("gs://b/run/eval/x.partial", {})
    parallel.pad_shard_unpad(lambda c, shard: {"y": shard["x"]}, {"x": np.arange(8.0)}, 8, store=store)
    assert epath.Path("gs://b/run/eval/x.partial/process_0/chunk_000000.npz").exists()
    chunk_store.clear("gs://b/run/eval/x.partial")
    assert not os.path.exists(tmp_path / "gs:")
    assert sorted(os.listdir(bucket / "b/run/samples")) == ["images", "samples.npz", "samples.png"]
    with np.load(bucket / "b/run/samples/samples.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], images)
    assert sorted(os.listdir(bucket / "b/run/eval")) == ["digits_x.json"]  # x.partial cleared

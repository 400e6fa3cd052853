"""DDPM on LSUN Church (outdoor) 256x256, the official recipe (Ho et al. 2020 App. B; `scripts/run_lsun.py`).

The CelebA-HQ model and optimiser (configs/celebahq256.py: 114M params, Adam 2e-5, batch 64, EMA
0.9999, dropout 0.0) on tfds's `lsun/church_outdoor` (126,227 images; the pipeline centre-crops and
resizes each to 256x256), random flips, 1.2M steps. tfds downloads LSUN once (and needs
`pip install tensorflow-io` to read its LMDB); or export the images to a folder and pass
--config.data.dataset=folder --config.data.data_dir=DIR (docs/data.md). On a TPU v4-32 pod slice (4 hosts):
    launch/create_vm.sh --accelerator=v4-32 --spot
    launch/setup_vm.sh --worker=all
    launch/train.sh --worker=all --config=configs/lsun_church256.py --workdir=gs://BUCKET/runs/church256 \
        -- --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""
from ddpm_jax import defaults


def get_config():
    c = defaults.load_config_file("celebahq256.py", relative_to=__file__)
    c.data.dataset = "lsun/church_outdoor"
    c.data.random_flip = True
    c.training.num_train_steps = 1_200_000
    return c

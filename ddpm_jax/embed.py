"""Embeds the captions of a folder of images with a frozen T5 encoder, for a model of precomputed
text embeddings (Imagen's recipe: the U-Net attends to a frozen T5's token embeddings).

    python -m ddpm_jax.embed --config=configs/shapes_t2i.py --config.data.dataset=folder --config.data.data_dir=mine \\
        --config.model.text_encoder=precomputed --config.model.text_encoder_path=t5-v1_1-xxl \\
        --config.model.text_emb_dim=4096

Reads the config's `data.data_dir` (images, each with its caption NAME.txt beside it),
`model.text_encoder_path` (a T5 checkpoint folder in the Hugging Face layout, see `ddpm_jax.t5`) and
`data.max_text_len` (tokens per caption, EOS included; longer captions are cut, as T5 tokenizers do),
and writes NAME.npz beside each caption, the file `data.dataset='folder'` reads. Files already written
by the same encoder are kept, so the same command resumes. Then train with the same config and flags
(docs/text_to_image.md, "A frozen T5 encoder").
The logic is in `ddpm_jax.datasets.folder.write_embeddings`.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only lists the folder; keep its log quiet

import jax  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ddpm_jax import cli, t5, validation  # noqa: E402
from ddpm_jax.validation import UserError  # noqa: E402


def define_flags(fv: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "The training config, e.g. configs/shapes_t2i.py with the "
                                    "overrides above.", flag_values=fv, lock_config=True)
    flags.DEFINE_integer("batch_size", 64, "Captions per encoder call.", lower_bound=1, flag_values=fv)
    flags.mark_flag_as_required("config", flag_values=fv)


def main(fv: flags.FlagValues, args: list[str]) -> None:
    cli.no_arguments(args)
    config = fv.config
    d, m = config.data, config.model
    if d.dataset != "folder" or m.text_encoder != "precomputed" or not m.text_encoder_path:
        raise UserError(f"--config: embedding captions needs data.dataset='folder' (is {d.dataset!r}), "
                        f"model.text_encoder='precomputed' (is {m.text_encoder!r}) and model.text_encoder_path "
                        f"(is {m.text_encoder_path!r}).")
    if d.embed_captions:
        raise UserError("--config: data.embed_captions=True embeds the captions on the devices as it trains; "
                        "these files are read with data.embed_captions=False.")
    validation.validate_data_and_model(config)
    from ddpm_jax.datasets import folder  # imported here: it imports TensorFlow Datasets

    encoder = t5.from_config(m)
    name = f"{encoder.fingerprint}_L{d.max_text_len}"
    written, stale, total = folder.write_embeddings(
        d.data_dir, lambda texts: encoder.embed(texts, d.max_text_len, batch_size=fv.batch_size), name, fv.batch_size)
    process = f"process {jax.process_index()} " if jax.process_count() > 1 else ""
    logging.info("data.data_dir=%s: %swrote %d embeddings, kept %d up to date (%d captions).", d.data_dir, process,
                 written, total - stale, total)


if __name__ == "__main__":
    cli.run(define_flags, main)

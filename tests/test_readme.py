"""The README's commands and code, run as written (parsed out of README.md, so the two cannot drift) on generated
files, with tiny overrides appended (a few steps, short sequences). Commands that would download (the Hugging Face
dataset and tokenizer) run with a local dataset folder and a local tokenizer in the same flags; loggers whose
packages are not installed here are resolved with --print_config. The install commands (pip, make) run in CI,
whose `make test` installs the package from a fresh clone.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from datamodules.tokenizer import build_tokenizer
from lightning_modules.cli import main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
MAKEFILE = (REPO / "Makefile").read_text()

# Appended to every `hgrn2 fit` command: two steps, one validation batch, short sequences.
TINY_FIT = [
    "--trainer.max_steps", "2", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
    "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "2", "--data.init_args.eval_batch_size", "2",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.callbacks.init_args.max_new_tokens", "20",
]  # fmt: skip
WORDS = "the quick brown fox jumps over a lazy dog while seven small stars watch it".split()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def shell_commands(text: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, split as a shell would."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [args for line in joined.splitlines() if (args := shlex.split(line, comments=True))]


def readme_commands() -> list[list[str]]:
    return [args for block in code_blocks("bash") for args in shell_commands(block)]


def hgrn2_commands(*must_contain: str) -> list[list[str]]:
    """The README's ``hgrn2`` commands that contain every one of ``must_contain``."""
    return [args for args in readme_commands() if args[0] == "hgrn2" and all(a in args for a in must_contain)]


def the_command(*must_contain: str) -> list[str]:
    (command,) = hgrn2_commands(*must_contain)
    return command


def run_cli(args: list[str]) -> None:
    """``hgrn2 <args>`` in this process (as the console script would run it)."""
    assert args[0] == "hgrn2"
    main(args[1:])


def write_texts(folder: Path, names: dict[str, int]) -> None:
    """Word salad, one document per line: ``names`` maps a file name to its number of lines."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = torch.Generator().manual_seed(0)
    for name, lines in names.items():
        picks = torch.randint(len(WORDS), (lines, 12), generator=rng).tolist()
        (folder / name).write_text("".join(" ".join(WORDS[i] for i in row) + "\n" for row in picks))


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A folder laid out like the repository root (configs/ linked), with the README's ``my_texts/``."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    write_texts(tmp_path / "my_texts", {"train.txt": 300, "valid.txt": 40})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HGRN2_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["hgrn2"])  # the CLI warns when given both args and the test runner's argv
    return tmp_path


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_every_readme_command_is_one_these_tests_run():
    handled = {
        "own files": hgrn2_commands("fit", "--data.init_args.data_files"),
        "hub dataset": hgrn2_commands("fit", "--data.init_args.dataset"),
        "loggers": hgrn2_commands("fit", "--trainer.logger"),
        "generate": hgrn2_commands("generate"),
        "pretrained": hgrn2_commands("export")
        + hgrn2_commands("convert")
        + hgrn2_commands("--model.init_args.init_from"),
    }
    # train + resume on own files; generate from a checkpoint and from a model folder
    assert [len(commands) for commands in handled.values()] == [2, 1, 2, 2, 3]
    covered = [command for commands in handled.values() for command in commands]
    for args in readme_commands():
        assert args in covered or args[0] in ("pip", "make"), f"README command without a test: {shlex.join(args)}"
    for args in readme_commands():  # make targets exist (CI runs `make test`; the demo's recipe runs below)
        assert args[0] != "make" or f"\n{args[1]}:" in MAKEFILE, f"README names a missing make target: {args}"
    for span in re.findall(r"`(hgrn2 [^`]*)`", README):  # inline: a subcommand's name, --help, or a pattern
        assert len(span.split()) == 2 or span.endswith("--help") or "FILE" in span, f"untested README command: {span}"


def test_own_text_files_train_resume_and_generate(workspace, capsys):
    train, resume = hgrn2_commands("fit", "--data.init_args.data_files")
    assert "--ckpt_path" not in train and "--ckpt_path" in resume
    checkpoint = workspace / "runs" / "lm_demo" / "checkpoints" / "last.ckpt"

    run_cli(train + TINY_FIT)
    assert checkpoint_step(checkpoint) == 2
    assert "validation loss" in capsys.readouterr().out
    hyper = torch.load(checkpoint, map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    assert hyper["data_files"] == {"train": "my_texts/train.txt", "val": "my_texts/valid.txt"}

    run_cli(resume + TINY_FIT + ["--trainer.max_steps", "4"])  # the README's 1,200 steps, cut to 4
    assert checkpoint_step(checkpoint) == 4  # went on from step 2
    capsys.readouterr()

    run_cli(the_command("generate", "runs/lm_demo/checkpoints/last.ckpt"))
    printed = capsys.readouterr().out
    assert printed.startswith("def ") and len(printed) > len("def ") + 1

    (snippet,) = [block for block in code_blocks("python") if "load_from_checkpoint" in block]
    exec(compile(snippet, "README.md", "exec"), {})
    assert capsys.readouterr().out.startswith("def ")


def local_tokenizer(folder: Path) -> int:
    """A word-level Hugging Face tokenizer of ``WORDS`` saved in ``folder``; returns its vocabulary size."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "</s>": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]")
    fast.save_pretrained(folder)
    return build_tokenizer(str(folder)).vocab_size


def test_hugging_face_dataset_command_with_a_local_dataset_and_tokenizer(workspace, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", workspace / "hf")
    write_texts(workspace / "hub_like", {"train.txt": 300, "validation.txt": 40, "test.txt": 40})
    vocab_size = local_tokenizer(workspace / "tokenizer")

    command = the_command("fit", "--data.init_args.dataset")
    local = {  # the README's values, and what this machine has instead (no downloads here)
        ("--data.init_args.dataset", "wikitext"): "hub_like",
        ("--data.init_args.dataset_config", "wikitext-103-raw-v1"): "null",
        ("--data.init_args.tokenizer", "gpt2"): str(workspace / "tokenizer"),
        ("--model.init_args.vocab_size", "50257"): str(vocab_size),
    }
    for (flag, value), replacement in local.items():
        at = command.index(flag)
        assert command[at + 1] == value, f"the README's {flag} changed: update this test"
        command[at + 1] = replacement
    run_cli(command + TINY_FIT)
    checkpoint = torch.load(workspace / "runs/lm_demo/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert checkpoint["datamodule_hyper_parameters"]["dataset"] == "hub_like"
    assert checkpoint["state_dict"]["model.embed.weight"].shape[0] == vocab_size


@pytest.mark.parametrize("logger", ["TensorBoardLogger", "WandbLogger"])
def test_logger_commands_resolve_to_the_named_logger(workspace, logger, capsys):
    import yaml

    (command,) = [c for c in hgrn2_commands("fit", "--trainer.logger") if f"lightning.pytorch.loggers.{logger}" in c]
    with pytest.raises(SystemExit) as exit_code:
        run_cli(command + ["--print_config"])
    assert exit_code.value.code in (0, None)
    parsed = yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]
    assert parsed["class_path"] == f"lightning.pytorch.loggers.{logger}"
    given = dict(zip(command, command[1:]))
    for key, value in parsed["init_args"].items():
        if f"--trainer.logger.{key}" in given:
            assert str(value) == given[f"--trainer.logger.{key}"]


def test_python_examples_run_and_their_shape_comments_hold(workspace):
    blocks = [block for block in code_blocks("python") if "load_from_checkpoint" not in block]
    assert len(blocks) == 3
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
        if "block" in namespace:
            assert namespace["y"].shape == (2, 100, 256) and namespace["state"].shape == (2, 4, 64, 64)
            assert namespace["more"].shape == (2, 20, 256)
        if "o" in namespace:
            assert namespace["o"].shape == (2, 128, 4, 64) and namespace["state"].shape == (2, 4, 64, 64)
        if "model" in namespace:
            assert namespace["model"](torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_generate_help_lists_the_options_the_readme_names(capsys):
    with pytest.raises(SystemExit) as exit_code:
        run_cli(shlex.split("hgrn2 generate --help"))
    assert exit_code.value.code == 0
    listed = capsys.readouterr().out
    for option in ("--temperature", "--top_k", "--top_p", "--num_samples", "--device"):
        assert option in listed


def test_make_demo_trains_on_the_embedded_corpus_and_samples(workspace, capsys):
    """`make demo` runs the Makefile's demo recipe: those commands, on the embedded corpus, with tiny overrides."""
    recipe = re.search(r"^demo: setup\n((?:\t.*\n)+)", MAKEFILE, flags=re.M).group(1)
    commands = shell_commands(recipe.replace("$(BIN)/", ""))
    assert [args[:2] for args in commands] == [["OMP_NUM_THREADS=1", "hgrn2"]] * 2
    fit, generate = (args[1:] for args in commands)
    run_cli(fit + TINY_FIT)
    assert checkpoint_step(workspace / "runs/lm_demo/checkpoints/last.ckpt") == 2
    assert "vs unigram baseline" in capsys.readouterr().out
    run_cli(generate + ["--max_new_tokens", "20"])
    assert capsys.readouterr().out.startswith(generate[generate.index("--prompt") + 1])


def test_pretrained_weights_commands_export_generate_convert_and_fine_tune(workspace, capsys):
    from hgrn2.models.lm import HGRN2ForCausalLM
    from tests.models.foreign_checkpoints import fla_config, fla_weights, write_folder

    export, convert, fine_tune = (
        the_command("export"),
        the_command("convert"),
        the_command("fit", "--model.init_args.init_from"),
    )
    run_cli(["hgrn2", "fit", "--config", "configs/lm/demo.yaml", *TINY_FIT])  # the checkpoint the README exports
    run_cli(export)
    folder = workspace / export[export.index("--out") + 1]
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    capsys.readouterr()
    run_cli(the_command("generate", str(folder.relative_to(workspace))) + ["--max_new_tokens", "20"])
    assert capsys.readouterr().out.startswith("def ")

    source = write_folder(workspace / convert[convert.index("fla") + 1], fla_config(), fla_weights(fla_config()))
    run_cli(convert)
    ids = torch.randint(0, 50, (2, 9))
    converted = HGRN2ForCausalLM.from_pretrained(workspace / convert[convert.index("--out") + 1])
    assert torch.equal(converted(ids).logits, HGRN2ForCausalLM.from_fla(source)(ids).logits)

    run_cli(fine_tune + TINY_FIT)  # starts from the exported folder
    checkpoint = torch.load(workspace / "runs/lm_demo/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2

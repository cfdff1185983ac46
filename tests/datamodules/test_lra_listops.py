"""ListOps: the generator against an independent stack evaluator, the release layout, the loader."""

from __future__ import annotations

import csv
import random

import numpy as np
import pytest

from datamodules.lra.generate_listops import (
    OPERATOR_PROBABILITY,
    ListOpsSpec,
    evaluate,
    main,
    random_tree,
    sample_examples,
    to_source,
)
from datamodules.lra.listops import TOKEN_IDS, VOCAB, ListOpsDataModule, encode, tokenize

SMALL = ListOpsSpec(max_depth=10, max_args=10, min_length=10, max_length=150)


def stack_evaluate(tokens: list[str]) -> tuple[int, int, int]:
    """``(value, depth, widest operator)`` of a token stream, evaluated left to right with a stack."""
    stack, value, depth, widest = [], None, 0, 0
    for token in tokens:
        if token.startswith("["):
            stack.append((token, []))
            depth = max(depth, len(stack))
            continue
        if token == "]":
            operator, args = stack.pop()
            widest = max(widest, len(args))
            ordered = sorted(args)
            middle = len(ordered) // 2
            result = {
                "[MIN": ordered[0],
                "[MAX": ordered[-1],
                "[MED": ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) // 2,
                "[SM": sum(args) % 10,
            }[operator]
        else:
            result = int(token)
        if stack:
            stack[-1][1].append(result)
        else:
            value = result
    assert not stack, "unbalanced expression"
    return value, depth + 1, widest  # a digit argument sits one level below its operator


def test_generated_labels_match_an_independent_stack_evaluator():
    examples = sample_examples(SMALL, 300, seed=1)
    assert len({source for source, _ in examples}) == 300
    for source, target in examples:
        tokens = tokenize(source)
        value, depth, widest = stack_evaluate(tokens)
        assert value == target, source
        assert SMALL.min_length < len(tokens) < SMALL.max_length
        assert depth <= SMALL.max_depth and 2 <= widest <= SMALL.max_args


def test_hand_written_trees_follow_the_official_string_form_and_rules():
    assert to_source(("[MAX", [2, 9])) == "( ( ( [MAX 2 ) 9 ) ] )"
    nested = ("[SM", [5, ("[MIN", [7, 3]), 9])
    assert to_source(nested) == "( ( ( ( [SM 5 ) ( ( ( [MIN 7 ) 3 ) ] ) ) 9 ) ] )"
    assert evaluate(nested) == (5 + 3 + 9) % 10
    assert evaluate(("[MED", [1, 2])) == 1  # int(1.5): the official int(np.median(...)) truncates
    assert evaluate(("[MED", [9, 1, 8, 3])) == 5  # median 5.5
    assert evaluate(("[MED", [4, 0, 7])) == 4


def test_a_node_is_an_operator_with_probability_one_quarter():
    rng = random.Random(0)
    spec = ListOpsSpec(max_depth=2, max_args=3, min_length=0, max_length=10)
    draws = 20_000
    operators = sum(not isinstance(random_tree(rng, 1, spec)[0], int) for _ in range(draws))
    assert OPERATOR_PROBABILITY == 0.25
    assert abs(operators / draws - 0.25) < 0.015  # 5 standard errors


def test_cli_writes_the_release_layout_that_the_datamodule_reads(tmp_path):
    main(["--out", str(tmp_path), "--train", "60", "--val", "12", "--test", "12", "--min-length", "10",
          "--max-length", "80", "--seed", "3"])  # fmt: skip
    rows = {}
    for split in ("train", "val", "test"):
        with open(tmp_path / f"basic_{split}.tsv", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            assert next(reader) == ["Source", "Target"]
            rows[split] = [(source, int(target)) for source, target in reader]
    assert [len(rows[s]) for s in ("train", "val", "test")] == [60, 12, 12]
    sources = [source for split in rows.values() for source, _ in split]
    assert len(set(sources)) == len(sources), "splits overlap"

    data = ListOpsDataModule(str(tmp_path), batch_size=12, max_length=2000)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    assert batch["input_ids"].shape[0] == 12
    for row, (source, target) in enumerate(rows["val"]):
        length = int(batch["attention_mask"][row].sum())
        decoded = [VOCAB[i] for i in batch["input_ids"][row, :length].tolist()]
        assert decoded == tokenize(source)
        assert int(batch["labels"][row]) == target
        assert (batch["input_ids"][row, length:] == 0).all()


def test_encoding_matches_a_token_by_token_lookup_and_truncates():
    for source, _ in sample_examples(SMALL, 20, seed=2):
        expected = [TOKEN_IDS[token] for token in tokenize(source)]
        np.testing.assert_array_equal(encode(source), expected)
        np.testing.assert_array_equal(encode(source, max_length=7), expected[:7])


def test_unknown_tokens_raise_a_value_error_naming_file_line_and_token(tmp_path):
    for split in ("train", "val", "test"):
        (tmp_path / f"basic_{split}.tsv").write_text("Source\tTarget\n( ( [MAX 2 ) 9 ] )\t9\n( ( [FIRST 2 ) 9 ] )\t2\n")
    with pytest.raises(ValueError, match=r"basic_train\.tsv:3: .*\[FIRST"):
        ListOpsDataModule(str(tmp_path)).setup()


def test_missing_data_raises_file_not_found_naming_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="basic_train.tsv") as error:
        ListOpsDataModule(str(tmp_path / "absent")).setup()
    assert "basic_test.tsv" in str(error.value) and "generate_listops" in str(error.value)


def test_generated_data_depend_on_the_seed_and_not_on_the_number_of_workers():
    import datamodules.lra.generate_listops as generator

    spec = ListOpsSpec(min_length=10, max_length=60)
    sizes = {"train": generator.CHUNK_EXAMPLES + 500, "val": 100, "test": 100}  # more than one generation job
    one = generator.generate(spec, sizes, seed=5, workers=1)
    two = generator.generate(spec, sizes, seed=5, workers=2)
    assert one == two
    assert generator.generate(spec, sizes, seed=6, workers=1) != one

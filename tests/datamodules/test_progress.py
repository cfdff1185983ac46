"""Progress bars on the long CPU work a user waits for: token caches and the LRA generators."""

from __future__ import annotations

import pytest

import datamodules.lra.common as common
import datamodules.text_cache as text_cache
from datamodules.lra.generate_listops import ListOpsSpec, write_listops
from datamodules.lra.generate_pathfinder import write_pathfinder
from datamodules.text import TextDataModule


class RecordingBar:
    """Stands in for tqdm: records every bar's title, total, unit and the sum of its updates."""

    bars: list[RecordingBar] = []

    def __init__(self, iterable=None, desc=None, total=None, unit="it", disable=False, **kwargs):
        self.desc, self.total, self.unit, self.disable, self.done = desc, total, unit, disable, 0
        RecordingBar.bars.append(self)

    def update(self, n: int = 1) -> None:
        self.done += n

    def set_postfix(self, refresh: bool = True, **kwargs) -> None:
        self.postfix = kwargs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def bars(monkeypatch):
    RecordingBar.bars = []
    monkeypatch.setattr(common, "tqdm", RecordingBar)
    monkeypatch.setattr(text_cache, "tqdm", RecordingBar)
    return RecordingBar.bars


def square(x: int) -> int:
    return x * x


def test_map_jobs_bar_advances_by_each_jobs_size_and_results_keep_their_order(bars):
    assert common.map_jobs(square, [3, 1, 2], workers=1, progress="squares", sizes=[5, 1, 4]) == [9, 1, 4]
    (bar,) = bars
    assert (bar.desc, bar.total, bar.done, bar.disable) == ("squares", 10, 10, None)  # None: shown on a terminal
    assert common.map_jobs(square, [2], workers=1) == [4] and bars[1].disable is True  # no title, no bar
    with pytest.raises(ValueError, match="one size per job: 2 sizes for 3 jobs"):
        common.map_jobs(square, [1, 2, 3], workers=1, sizes=[1, 1])


def test_generators_count_expressions_and_images(bars, tmp_path):
    spec = ListOpsSpec(max_depth=3, max_args=3, min_length=5, max_length=40)
    write_listops(tmp_path / "listops", train=30, val=5, test=5, spec=spec)
    assert [(bar.desc, bar.total, bar.done) for bar in bars] == [("ListOps expressions", 40, 40)]
    write_pathfinder(tmp_path, resolution=32, images=5, images_per_batch=2, contour_length=6)
    assert (bars[-1].desc, bars[-1].total, bars[-1].done, bars[-1].unit) == ("Pathfinder-32 images", 5, 5, " images")


def test_token_cache_bar_counts_the_documents_it_tokenized(bars, tmp_path):
    (tmp_path / "train.txt").write_text("".join(f"line {i}\n" for i in range(300)))
    files = {"train": str(tmp_path / "train.txt")}
    dm = TextDataModule(data_files=files, seq_len=4, holdout_permille=100, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    assert len(bars) == 3 and all(bar.desc.startswith("tokenizing files-byte-") for bar in bars)
    dm.setup("fit")
    dm.setup("test")
    counted = [bar.done for bar in bars]
    assert sum(counted) == 300 and counted[0] == dm.meta["train"]["num_documents"]
    assert bars[0].postfix == {"tokens": dm.meta["train"]["num_tokens"]}

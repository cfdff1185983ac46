"""Long Range Arena: one LightningDataModule per task, and the ListOps and Pathfinder generators."""

from datamodules.lra.image import ImageDataModule
from datamodules.lra.listops import ListOpsDataModule
from datamodules.lra.pathfinder import PathfinderDataModule, PathXDataModule
from datamodules.lra.retrieval import RetrievalDataModule
from datamodules.lra.text import TextDataModule

__all__ = [
    "ImageDataModule",
    "ListOpsDataModule",
    "PathXDataModule",
    "PathfinderDataModule",
    "RetrievalDataModule",
    "TextDataModule",
]

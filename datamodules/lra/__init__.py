"""Long Range Arena: one LightningDataModule per task, and the ListOps and Pathfinder generators."""

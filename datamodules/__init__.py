"""LightningDataModules, one per dataset family."""

"""LightningDataModules: fundus photograph folders, MedMNIST files, and the embedded default."""

"""Image-classification data: the built-in demo dataset and the ImageFolder/ImageNet loaders."""

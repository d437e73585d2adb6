"""Using a trained model: loading it from a bundle or the registry, prediction and evaluation."""

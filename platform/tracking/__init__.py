"""MLflow: where runs go and what they log, the run lifecycle, the model registry, the resume record
and the pyfunc wrapper of a registered model."""

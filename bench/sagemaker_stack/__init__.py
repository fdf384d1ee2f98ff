"""The SageMaker XGBoost container's serving stack, rebuilt for ``bench.sagemaker``."""

# Placeholder until the SageMaker container issue (#4): builds the package and serves the demo model.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends gcc && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/rtbserve
COPY pyproject.toml README.md ./
COPY rtbserve ./rtbserve
COPY models ./models
RUN pip install --no-cache-dir .
ENTRYPOINT ["rtbserve"]
CMD ["serve"]

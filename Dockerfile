# syntax=docker/dockerfile:1
# rtbserve as a SageMaker bring-your-own container (README "SageMaker container").
#
#   docker build -t rtbserve .                                  # serves /opt/ml/model
#   docker build -t rtbserve --build-arg MODEL_DIR=models/rtb-filter .   # + a baked-in model
#   docker run -p 8080:8080 -v "$PWD/ml:/opt/ml:ro" rtbserve serve
#
# Stage 1 builds wheels for rtbserve and its locked dependencies (requirements.lock); the
# runtime stage installs them without a compiler, fills numba's kernel cache for a generic
# x86-64 CPU (valid on any SageMaker instance: no ~100 s JIT at start), and compiles and
# verifies a baked-in model. SageMaker runs `docker run IMAGE serve`: the exec-form ENTRYPOINT
# makes `serve` PID 1, which forwards signals to the supervisor and reaps orphans itself.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheels
# gcc builds rtbserve's optional CSV extension; the dependencies are binary wheels
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements.lock ./
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels -r requirements.lock
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true \
      com.amazonaws.sagemaker.capabilities.multi-models=true \
      org.opencontainers.image.title="rtbserve" \
      org.opencontainers.image.description="Compiled XGBoost/LightGBM serving for real-time bidding"
# true: gcc for the tl2cgen backend, which only models numba refuses (categorical splits)
# need; without it those models are served by the reference library instead
ARG WITH_GCC=false
# generic: numba's kernel cache fits every x86-64 CPU; empty: tuned for the build machine's
# CPU (faster only on that CPU model; elsewhere the kernels are compiled again at start)
ARG NUMBA_CPU_NAME=generic
# a model directory in the build context to bake in, compiled and verified at build time
ARG MODEL_DIR=""
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RTBSERVE_CACHE_DIR=/opt/rtbserve/cache \
    NUMBA_CACHE_DIR=/opt/rtbserve/numba-cache \
    NUMBA_CPU_NAME=${NUMBA_CPU_NAME} \
    RTBSERVE_BAKED_MODEL=/opt/rtbserve/model
RUN if [ "$WITH_GCC" = "true" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi
# --no-deps: the lock is the whole set (xgboost comes as xgboost-cpu, see requirements.lock)
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-deps --no-index /wheels/*.whl \
    && python -c "import rtbserve, xgboost, lightgbm, treelite, tl2cgen, grpc, uvloop" \
    && python -m rtbserve.predictors.numba_impl
RUN --mount=type=bind,source=.,target=/context \
    mkdir -p "$RTBSERVE_BAKED_MODEL" "$RTBSERVE_CACHE_DIR" \
    && if [ -n "$MODEL_DIR" ]; then \
        cp -R "/context/$MODEL_DIR/." "$RTBSERVE_BAKED_MODEL/" \
        && SAGEMAKER_BASE_DIR=/nonexistent serve compile; \
    fi
EXPOSE 8080
# SageMaker expects containers to run as root (its docs); /opt/ml is mounted read-only.
ENTRYPOINT ["serve"]

# lightning_rlm in a container. CPU image by default (CPU-only torch wheel); GPU image by a build arg:
#   docker build -t lightning-rlm .                                  # CPU
#   docker build -t lightning-rlm:gpu --build-arg TORCH_VARIANT=cu128 .   # CUDA torch wheel (index .../whl/cu128)
# Run with the data, the runs and the cache on volumes, so results and the converted base models outlive --rm:
#   docker run --rm -v $PWD/../shared/data:/data -e LRLM_DATA_DIR=/data \
#     -v $PWD/runs:/work/runs -v lrlm-cache:/home/lrlm/.cache \
#     lightning-rlm fit --config configs/lm/gru_shakespeare.yaml
# Offline hosts: add -e HF_HUB_OFFLINE=1 (not baked in: a user with network may load hub models).
FROM python:3.11-slim
ARG TORCH_VARIANT=cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --create-home --uid 1000 lrlm
WORKDIR /app
# Dependencies first (a layer that only changes with pyproject.toml), then the source.
COPY pyproject.toml README.md LICENSE ./
RUN pip install torch==2.13.0 --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
 && python -c "import tomllib; print('\n'.join(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if not d.startswith('torch')))" > /tmp/deps.txt \
 && pip install -r /tmp/deps.txt
COPY lightning_rlm ./lightning_rlm
COPY configs ./configs
COPY benchmarks ./benchmarks
RUN pip install --no-deps -e . \
 && mkdir -p /work/runs && ln -s /app/configs /work/configs && chown -R lrlm /work
USER lrlm
WORKDIR /work
ENTRYPOINT ["lightning-rlm"]
CMD ["--help"]

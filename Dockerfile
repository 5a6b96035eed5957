# CPU image: installs lightning_rlm and runs `lightning-rlm`.
#   docker build -t lightning-rlm .
#   docker run --rm -v $PWD/../shared/data:/data -e LRLM_DATA_DIR=/data lightning-rlm fit --config configs/lm/gru_shakespeare.yaml
# For a CPU-only torch wheel, pass the PyTorch CPU wheel index: --build-arg TORCH_INDEX_URL=<that index URL>
FROM python:3.11-slim
ARG TORCH_INDEX_URL=""
WORKDIR /app
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
COPY pyproject.toml README.md ./
COPY lightning_rlm ./lightning_rlm
COPY configs ./configs
COPY benchmarks ./benchmarks
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --no-cache-dir torch==2.13.0 --index-url "$TORCH_INDEX_URL"; fi \
 && pip install --no-cache-dir -e .
ENTRYPOINT ["lightning-rlm"]
CMD ["--help"]

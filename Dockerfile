# The worker image of docker-compose.yml: this project installed, runs the flow's stages on the GPU.
FROM python:3.11-slim
WORKDIR /opt/dmd-pipeline
COPY . .
# [s3]: s3fs, for store: s3://bucket/prefix; [gs]: gcsfs, for store: gs://bucket/prefix (credentials come from the environment)
RUN pip install --no-cache-dir -e '.[s3,gs]'
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false

# The worker image of docker-compose.yml: this project installed, runs the flow's stages on the GPU.
FROM python:3.11-slim
WORKDIR /opt/dmd-pipeline
COPY . .
RUN pip install --no-cache-dir -e .
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false

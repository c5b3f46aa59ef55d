# Keras Image Trainer: one image, three roles (the first argument chooses; see trainer/container.py):
#   docker build -t kit .
#   docker run --gpus all kit --training_data_path=gs://... --job-dir=gs://... ...   Vertex AI custom job, local run
#   docker run --gpus all -v /opt/ml:/opt/ml kit train                               SageMaker training (/opt/ml)
#   docker run -p 8080:8080 -v $PWD/model:/opt/ml/model kit serve                    SageMaker / Vertex AI prediction
FROM tensorflow/tensorflow:2.21.0-gpu

WORKDIR /opt/keras-image-trainer
COPY setup.py README.md ./
COPY trainer ./trainer
COPY hptuning ./hptuning
COPY sample_configs ./sample_configs
RUN pip install --no-cache-dir .

# SageMaker hosting calls port 8080; Vertex AI's AIP_HTTP_PORT is 8080 unless it says otherwise.
EXPOSE 8080
ENTRYPOINT ["python", "-m", "trainer.container"]

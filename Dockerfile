# Keras Image Trainer as a cloud training-job container:
#   docker build -t kit . && docker run --gpus all kit --training_data_path=gs://... --job-dir=gs://... ...
FROM tensorflow/tensorflow:2.21.0-gpu

WORKDIR /opt/keras-image-trainer
COPY setup.py README.md ./
COPY trainer ./trainer
COPY hptuning ./hptuning
COPY sample_configs ./sample_configs
RUN pip install --no-cache-dir .

ENTRYPOINT ["python", "-m", "trainer.task"]

"""`python -m trainer.predict`: the documented entry point of batch prediction (code: trainer/serving/predict.py)."""
from trainer.serving import predict

if __name__ == "__main__":
    predict.main()

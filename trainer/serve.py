"""`python -m trainer.serve`: the documented entry point of the REST server (code: trainer/serving/serve.py)."""
from trainer.serving import serve

if __name__ == "__main__":
    serve.main()

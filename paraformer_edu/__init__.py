"""paraformer_edu: Paraformer from scratch, the package of the paraformer-edu book.

Each module is generated from the chapter that builds it (see its banner); this
file, hand-written, gathers the public API:

- `data` (chapter 1): audio loading, the synthetic corpus, datasets and batching;
- `features` (chapter 1): log-mel filterbank, LFR, CMVN, SpecAugment, the front end;
- `tokenizer` (chapter 2): text normalisation, character and BPE tokenizers;
- `attention` (chapter 3): scaled dot-product and multi-head attention, masks;
- `encoder` (chapter 4): the SAN-M encoder, CTC;
- `predictor` (chapter 5): continuous integrate-and-fire (CIF);
- `decoder`, `model` (chapter 6): the parallel decoder, the GLM sampler, the whole Paraformer;
- `metrics`, `config`, `training`, `checkpoint` (chapter 7): CER/WER, the recipe, the trainer,
  checkpoints and `load_model`;
- `inspection` (chapter 8): attention maps and predictor internals of one utterance (`look_inside`),
  word timestamps with bias correction, onset errors, CER by group;
- `plots` (chapter 8, needs matplotlib; not imported here): the chapter's figures, for any model;
- `cli` (hand-written): `python -m paraformer_edu train | evaluate | transcribe`.
"""

__version__ = "0.1.0"

from . import (attention, checkpoint, config, data, decoder, encoder, features, inspection, metrics, model, predictor,
               tokenizer, training)
from .attention import MultiHeadAttention, scaled_dot_product_attention, sinusoidal_positional_encoding
from .checkpoint import CheckpointError, Recognizer, Transcript, load_model
from .config import Config, load_config
from .data import (AudioError, BucketBatchSampler, SpeechDataset, build_corpus, collate, corpus_config,
                   load_audio, read_manifest, synthesize)
from .decoder import ParaformerDecoder, glm_sample
from .encoder import CTCHead, EncoderConfig, SANMEncoder, ctc_greedy_decode, ctc_loss
from .features import CMVN, Frontend, SpecAugment, fbank, lfr
from .inspection import Inside, cer_by, look_inside, onset_errors, word_timestamps
from .metrics import cer, wer
from .model import Hypothesis, Paraformer, ParaformerConfig
from .predictor import CifPredictor, cif, cif_timestamps, quantity_loss
from .tokenizer import BPETokenizer, CharTokenizer, Tokenizer, normalize_text
from .training import Trainer

__all__ = [
    "__version__",
    # modules
    "data", "features", "tokenizer", "attention", "encoder", "predictor", "decoder", "model", "metrics", "config", "training", "checkpoint", "inspection",
    # chapter 1
    "AudioError", "load_audio", "synthesize", "build_corpus", "corpus_config", "read_manifest",
    "SpeechDataset", "BucketBatchSampler", "collate", "fbank", "lfr", "CMVN", "SpecAugment", "Frontend",
    # chapter 2
    "normalize_text", "Tokenizer", "CharTokenizer", "BPETokenizer",
    # chapter 3
    "scaled_dot_product_attention", "MultiHeadAttention", "sinusoidal_positional_encoding",
    # chapter 4
    "EncoderConfig", "SANMEncoder", "CTCHead", "ctc_loss", "ctc_greedy_decode",
    # chapter 5
    "CifPredictor", "cif", "cif_timestamps", "quantity_loss",
    # chapter 6
    "ParaformerDecoder", "glm_sample", "ParaformerConfig", "Paraformer", "Hypothesis",
    # chapter 7
    "cer", "wer", "Config", "load_config", "Trainer", "CheckpointError", "Recognizer", "Transcript", "load_model",
    # chapter 8
    "Inside", "look_inside", "word_timestamps", "onset_errors", "cer_by",
]

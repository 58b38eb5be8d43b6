"""paraformer_edu: Paraformer from scratch, the package of the paraformer-edu book.

Each module is generated from the chapter that builds it (see its banner); this
file, hand-written, gathers the public API:

- `audio` (chapter 1): `load_audio`, the one door for audio, and its checks;
- `synthesis` (chapter 1): the espeak-ng speech synthesiser, driven through ctypes;
- `corpus` (chapter 1): the synthetic corpus: voices, text, plan, synthesis, manifests;
- `features` (chapter 1): log-mel filterbank, LFR, CMVN, SpecAugment, the front end, the feature cache;
- `dataset` (chapter 1): the dataset of a manifest, length-bucketed batches, padding;
- `tokenizer` (chapter 2): text normalisation, character and BPE tokenizers;
- `attention` (chapter 3): scaled dot-product and multi-head attention, masks;
- `encoder` (chapter 4): the SAN-M encoder, CTC;
- `predictor` (chapter 5): continuous integrate-and-fire (CIF);
- `decoder`, `model` (chapter 6): the parallel decoder, the GLM sampler, the whole Paraformer;
- `metrics`, `config`, `training`, `checkpoint` (chapter 7): CER/WER, the recipe, the trainer,
  saving, loading and averaging checkpoints;
- `phonemes` (chapter 7): espeak-ng's phonemes of a transcript and `PhonemeCTC`, the auxiliary phoneme
  CTC loss on an intermediate encoder layer (`training.phoneme_ctc`);
- `inference` (chapter 7): `load_model`, the `Recognizer` and its `Transcript`s;
- `inspection` (chapter 8): attention maps and predictor internals of one utterance (`look_inside`),
  word timestamps with bias correction, onset errors, CER by group;
- `plots` (chapter 8, needs matplotlib; not imported here): the chapter's figures, for any model;
- `language_model` (chapter 9): a token n-gram LM with interpolated Kneser-Ney smoothing, its WordNet text;
- `beam_search` (chapter 9): beam search over the Paraformer's positions and CTC prefix beam search, with
  shallow fusion of the LM (`LMSearch` plugs into `Recognizer(search=...)`);
- `transcription` (chapter 10): long recordings block by block (energy VAD, cuts at the quietest moment,
  stitched timestamps) and folders of files into resumable JSON lines;
- `onnx_export` (chapter 10, needs onnx and onnxruntime; not imported here): the whole model as one ONNX graph;
- `serving` (chapter 10, needs the [serve] extra; not imported here): the FastAPI service;
- `corpora` (chapter 11): real corpora (LibriSpeech, LJSpeech, Common Voice, JSON lines) into checked manifests,
  bad rows reported with their file and line; the real recordings of PyPI's pocketsphinx source package;
- `baselines` (chapter 12): the CTC and autoregressive baselines (key/value-cached greedy decoding, batched
  length-normalised beam search), Paraformer-v2 (queries from CTC segments), `BaselineTrainer`, `decode_seconds`;
- `distributed` (chapter 11): `DistributedTrainer`, data parallelism under torchrun and gradient accumulation that
  train the same model as one process;
- `display` (hand-written, needs IPython and matplotlib; not imported here): the chapters' figure
  style, labelled audio players and text tables;
- `cli` (hand-written): `python -m paraformer_edu train | prepare | evaluate | transcribe | serve`.
"""

__version__ = "0.1.0"

from . import (attention, audio, baselines, beam_search, checkpoint, config, corpora, corpus, dataset, decoder, distributed,
               encoder, features, inference, inspection, language_model, metrics, model, phonemes, predictor, synthesis,
               tokenizer, training, transcription)
from .attention import MultiHeadAttention, scaled_dot_product_attention, sinusoidal_positional_encoding
from .audio import AudioError, load_audio
from .baselines import ARModel, BaselineTrainer, CTCModel, ParaformerV2
from .beam_search import Beam, LMSearch, ctc_prefix_beam_search, paraformer_beam_search
from .checkpoint import CheckpointError, average_checkpoints
from .config import Config, load_config
from .corpora import CorpusError, prepare_corpus, prepare_manifest, real_recordings
from .corpus import build_corpus, corpus_config, read_manifest
from .dataset import BucketBatchSampler, SpeechDataset, collate
from .decoder import ParaformerDecoder, glm_sample
from .distributed import DistributedTrainer
from .encoder import CTCHead, EncoderConfig, SANMEncoder, ctc_greedy_decode, ctc_loss
from .features import CMVN, DiskFeatures, Frontend, SpecAugment, fbank, lfr
from .inference import Recognizer, Transcript, load_model
from .inspection import Inside, cer_by, look_inside, onset_errors, word_timestamps
from .language_model import NGramLM, book_language_model
from .metrics import cer, wer
from .model import Hypothesis, Paraformer, ParaformerConfig
from .phonemes import PhonemeCTC, espeak_phonemes
from .predictor import CifPredictor, cif, cif_timestamps, quantity_loss
from .synthesis import synthesize
from .tokenizer import BPETokenizer, CharTokenizer, Tokenizer, normalize_text
from .training import Trainer
from .transcription import LongTranscript, transcribe_files, transcribe_long

__all__ = [
    "__version__",
    # modules
    "audio", "synthesis", "corpus", "features", "dataset", "tokenizer", "attention", "encoder", "predictor", "decoder",
    "model", "metrics", "config", "training", "phonemes", "checkpoint", "inference", "inspection", "language_model", "beam_search",
    "transcription", "corpora", "distributed", "baselines",
    # chapter 1
    "AudioError", "load_audio", "synthesize", "build_corpus", "corpus_config", "read_manifest",
    "SpeechDataset", "BucketBatchSampler", "collate", "fbank", "lfr", "CMVN", "SpecAugment", "Frontend",
    "DiskFeatures",
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
    "cer", "wer", "Config", "load_config", "Trainer", "PhonemeCTC", "espeak_phonemes", "CheckpointError",
    "average_checkpoints", "Recognizer",
    "Transcript", "load_model",
    # chapter 8
    "Inside", "look_inside", "word_timestamps", "onset_errors", "cer_by",
    # chapter 9
    "NGramLM", "book_language_model", "Beam", "paraformer_beam_search", "ctc_prefix_beam_search", "LMSearch",
    # chapter 10
    "LongTranscript", "transcribe_long", "transcribe_files",
    # chapter 11
    "CorpusError", "prepare_manifest", "prepare_corpus", "real_recordings", "DistributedTrainer",
    # chapter 12
    "ARModel", "CTCModel", "ParaformerV2", "BaselineTrainer",
]

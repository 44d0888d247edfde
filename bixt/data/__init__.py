"""Datasets for training and evaluation, chosen by one `--data` SPEC string.

  digits                          scikit-learn's 8x8 handwritten digits (shipped with it), fixed stratified 80/20 split
  shapes[:points=N,train=N,...]   procedural point clouds of 10 shape classes, generated on the fly
  imagefolder:PATH                PATH/train/<class>/*.jpg|png... and PATH/val/<class>/... (the ImageNet layout)
  cifar10:PATH, cifar100:PATH     the python-batches layout (cifar-10-batches-py/, cifar-100-python/)
  fashion-mnist[:PATH]            Fashion-MNIST's IDX files (default /usr/share/datasets/fashion-mnist/, Debian's
                                  dataset-fashion-mnist), gzipped or not
  modelnet40:PATH                 the PointNet HDF5 files (*train*.h5, *test*.h5; needs h5py)
  listops[:length=N,train=N,...]  procedural ListOps expressions (LRA's task, shorter), as bytes, generated here
  textfolder:PATH                 PATH/train/<class>/<file> and PATH/test/<class>/... (or val/), read as bytes

Sequences are bytes (ids 0-255) padded with byte 0 to a common length; `Data.pad_id` tells the training and
evaluation loops to pass the padding as a mask, so padding changes no prediction.

Every random choice (augmentation, shape generation) comes from a generator seeded by (seed, epoch, sample index),
never from a shared stream: the data a sample sees is the same whatever the number of processes, the batch split
or the step at which a run was resumed.

Modules: spec (DataSpec, Data, a kind's table row), sources (a loader per kind, TABLE, parse_spec, build_data),
datasets (the splits), transforms (normalization, augmentation, the per-sample generators), readers (files on disk),
shapes and listops (the procedural sets).
"""
from __future__ import annotations

from bixt.data.datasets import CROP_PCT, ImageFolderSplit, ShapesSplit, TensorSplit
from bixt.data.listops import MIN_LENGTH as LISTOPS_MIN_LENGTH
from bixt.data.listops import make_expression
from bixt.data.readers import IMAGE_SUFFIXES, PAD_ID, DataFileError
from bixt.data.shapes import SHAPES, make_shape, random_rotation
from bixt.data.sources import DEFAULT_MODELS, SPECS, TABLE, build_data, parse_spec
from bixt.data.spec import Data, DataSpec, Request, Source, check_same_classes
from bixt.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageAugment, Normalize, PointAugment, sample_rng

__all__ = [
    "CROP_PCT", "DEFAULT_MODELS", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "LISTOPS_MIN_LENGTH", "PAD_ID",
    "SHAPES", "SPECS", "TABLE", "Data", "DataFileError", "DataSpec", "ImageAugment", "ImageFolderSplit", "Normalize",
    "PointAugment", "Request", "ShapesSplit", "Source", "TensorSplit", "build_data", "check_same_classes",
    "make_expression", "make_shape", "parse_spec", "random_rotation", "sample_rng",
]

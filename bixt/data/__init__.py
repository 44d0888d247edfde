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

Dense (per-token) kinds, `Data.task == "segment"`: a sample is (x, y) with y one int64 label per point (N,) or per
pixel (H, W); labels equal to `Data.ignore_index` are void, never trained on or counted.

  partshapes[:points=N,train=N,test=N,seed=N]  procedural objects (dumbbell, table, lamp, mug, chair, rocket) with
                                  15 part labels, generated on the fly; `Data.category_parts` maps category -> parts
  segscenes[:size=N,train=N,test=N,seed=N]     procedural scenes of textured shapes, 6 classes (0 = background, a
                                  real class), later shapes occluding earlier ones, no void pixels
  shapenetpart:PATH               PointNet's ShapeNetPart HDF5 files (*train*.h5 and *val*.h5 trained on, *test*.h5;
                                  needs h5py): 16 categories, 50 parts
  ade20k:PATH                     ADEChallengeData2016/ (or its parent): images/{training,validation}/*.jpg and
                                  annotations/.../*.png; label 0 is void, k is class k-1; 150 classes unless
                                  objectInfo150.csv lists others

Sequences are bytes (ids 0-255) padded with byte 0 to a common length; `Data.pad_id` tells the training and
evaluation loops to pass the padding as a mask, so padding changes no prediction.

Every random choice (augmentation, shape generation) comes from a generator seeded by (seed, epoch, sample index),
never from a shared stream: the data a sample sees is the same whatever the number of processes, the batch split
or the step at which a run was resumed.

Modules: spec (DataSpec, Data, a kind's table row), sources (a loader per kind, TABLE, parse_spec, build_data),
datasets (the splits), transforms (normalization, augmentation, the per-sample generators), readers (files on disk),
shapes and listops (the procedural sets), dense (the procedural dense sets and the dense splits).
"""
from __future__ import annotations

from bixt.data.datasets import CROP_PCT, ImageFolderSplit, ShapesSplit, SubsetSplit, TensorSplit, take
from bixt.data.dense import (
    CATEGORY_PARTS,
    PART_CATEGORIES,
    PART_NAMES,
    SCENE_CLASSES,
    PartShapesSplit,
    SegFolderSplit,
    SegScenesSplit,
    make_part_shape,
    make_scene,
)
from bixt.data.listops import MIN_LENGTH as LISTOPS_MIN_LENGTH
from bixt.data.listops import make_expression
from bixt.data.readers import IMAGE_SUFFIXES, PAD_ID, SHAPENETPART_PARTS, DataFileError
from bixt.data.shapes import SHAPES, make_shape, random_rotation
from bixt.data.sources import DEFAULT_MODELS, DEFAULT_RECIPES, SPECS, TABLE, build_data, parse_spec
from bixt.data.spec import Data, DataSpec, Request, Source, category_of, check_category_parts, check_same_classes
from bixt.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageAugment, Normalize, PointAugment, sample_rng

__all__ = [
    "CATEGORY_PARTS", "PART_CATEGORIES", "PART_NAMES", "SCENE_CLASSES", "SHAPENETPART_PARTS", "PartShapesSplit",
    "SegFolderSplit", "SegScenesSplit", "category_of", "check_category_parts", "make_part_shape", "make_scene",
    "CROP_PCT", "DEFAULT_MODELS", "DEFAULT_RECIPES", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES",
    "LISTOPS_MIN_LENGTH", "PAD_ID",
    "SHAPES", "SPECS", "TABLE", "Data", "DataFileError", "DataSpec", "ImageAugment", "ImageFolderSplit", "Normalize",
    "PointAugment", "Request", "ShapesSplit", "Source", "SubsetSplit", "TensorSplit", "build_data",
    "check_same_classes", "make_expression", "make_shape", "parse_spec", "random_rotation", "sample_rng", "take",
]

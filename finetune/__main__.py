import sys

from pretrain.quiet import filter_third_party_warnings

filter_third_party_warnings()  # before megatron-core / DeepSpeed are imported

from .cli import main  # noqa: E402

sys.exit(main())

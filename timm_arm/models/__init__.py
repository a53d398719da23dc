from .arm_mamba import ArmMamba, checkpoint_filter_fn, resample_pos_embed, scan_orders
from .arm_pretrain import ArmPretrainer, create_pretrainer

"""The one kernel-category map: names seen in the H200 profile and in a vLLM decode step."""

import pytest

from dqprof.measure.categories import STEP_CATEGORIES, SWEEP_CATEGORIES, categorize, sweep_category


@pytest.mark.parametrize("name, category", [
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*)", "dequant"),
    ("void vllm::dynamic_per_token_scaled_fp8_quant_kernel<c10::BFloat16>", "quantize"),
    ("void vllm::scaled_fp8_quant_kernel<c10::BFloat16, c10::Float8_e4m3fn>", "quantize"),
    # vLLM 0.20.2's FP8 activation quantize (per token) and per-tensor weight quantize kernels,
    # as named in its _C.abi3.so
    ("void vllm::dynamic_per_token_scaled_fp8_quant_kernel_strided<c10::BFloat16, "
     "c10::Float8_e4m3fn>(c10::Float8_e4m3fn*, float*, c10::BFloat16 const*, float const*, int, "
     "long, long)", "quantize"),
    ("void vllm::segmented_max_reduction_strided<c10::BFloat16, c10::Float8_e4m3fn>(float*, "
     "c10::BFloat16 const*, int, long, long)", "quantize"),
    ("void vllm::scaled_fp8_quant_kernel_strided_dynamic<c10::BFloat16, c10::Float8_e4m3fn>",
     "quantize"),
    # gemlite 0.6's Triton kernels (M <= 4, M < 64, larger M)
    ("gemv_INT_revsplitK_kernel", "gemm"),
    ("gemm_splitK_INT_kernel", "gemm"),
    ("gemm_INT_kernel", "gemm"),
    ("nvjet_sm90_tst_128x8_64x12_4x1_v_bz_splitK_TNT", "gemm"),
    ("void marlin::Marlin<1125899906909960l, 128, 1, 4, 8, false>(int4 const*)", "gemm"),
    ("void cutlass::device_kernel<machete::MacheteKernelTemplate<...>>", "gemm"),
    ("_nf4_mm_kernel", "gemm"),
    ("kernel_unified_attention_2d", "attention"),
    ("void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16>", "attention"),
    ("_compute_slot_mapping_kernel", "attention"),  # vLLM 0.20.2's, in every decode step
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "norm/elementwise"),
    ("triton_poi_fused_gelu_mul_3", "norm/elementwise"),
    ("void at::native::indexSelectLargeIndex<c10::BFloat16, long>", "gather"),
    # a gather that torch.compile fused with its scaling (Gemma 4's PLE lookup in vLLM)
    ("triton_poi_fused_embedding_mul_0", "gather"),
    ("triton_red_fused_add_mean_mul_pow_rsqrt_2", "norm/elementwise"),
    # a decode step's other kernels (tests/data/vllm_decode_trace.json)
    ("void kgemm_4bit_inference_naive<__nv_bfloat16, 128, 16>(int, int, int)", "gemm"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>", "gemm"),
    ("void vllm::rotary_embedding_kernel<c10::BFloat16, true>(long const*)", "attention"),
    ("void vllm::act_and_mul_kernel<c10::BFloat16, &vllm::gelu_tanh_kernel>", "norm/elementwise"),
    ("void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>", "sampling"),
    ("void at::native::cunn_SoftMaxForward<4, float, float, float>", "sampling"),
    ("void at::native::distribution_elementwise_grid_stride_kernel<float, 4, exponential_kernel>",
     "sampling"),
    ("void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>", "cast/copy"),
    ("Memcpy DtoH (Device -> Pinned)", "cast/copy"),
    ("void at::native::reduce_kernel<512, 1, ArgMaxOps<float>>", "sampling"),
    ("Memset (Device)", "cast/copy"),
    ("some_kernel_nobody_named", "other"),
])
def test_categorize(name, category):
    assert categorize(name) == category
    assert category in STEP_CATEGORIES


def test_sweep_view_folds_step_categories():
    # an isolated GEMM call's elementwise adds (split-K partials, nested absmax offset) are the
    # sweep's cast/copy, as the committed profile records them
    name = "void at::native::elementwise_kernel<128, 2, gpu_kernel_impl_nocast<CUDAFunctor_add>>"
    assert categorize(name) == "norm/elementwise"
    assert sweep_category(name) == "cast/copy"
    assert sweep_category("kernel_unified_attention_2d") == "other"
    assert {sweep_category(n) for n in ("a", "gemv_x", "quant_y")} <= set(SWEEP_CATEGORIES)

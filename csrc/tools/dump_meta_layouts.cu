// Prints CUTLASS's own metadata layouts as permutations, to pin sparseq/cutlass_layout.py.
//
// Host-only (no GPU needed): for each layout, the destination index of every canonical
// metadata unit (a byte on sm90, a 16/32-bit word on sm80), row-major over the canonical
// [rows, units] grid, computed with CUTLASS's own layout code:
//   sm90: Sm90GemmSparseConfig::fill_layoutE, recast to bytes exactly as the sm90 compressor
//         (cutlass/transform/kernel/sm90_sparse_gemm_compressor.hpp) does;
//   sm80: cutlass::reorder_meta (tools/util/host_reorder.h) into ColumnMajorInterleaved<2>.
// Build: nvcc -std=c++17 -I<cutlass>/include -I<cutlass>/tools/util/include dump_meta_layouts.cu
// Output lines: "<layout> <rows> <k> <index0> <index1> ..."
#include <cstdio>
#include <cstdint>
#include <vector>

#include "cute/tensor.hpp"
#include "cute/pointer_sparse.hpp"
#include "cutlass/gemm/collective/builders/sm90_sparse_config.inl"
#include "cutlass/layout/matrix.h"
#include "cutlass/tensor_ref.h"
#include "cutlass/gemm_coord.h"

using namespace cute;

// cutlass::reorder_meta from tools/util/include/cutlass/util/host_reorder.h, copied verbatim in
// behaviour but without HostTensor (which would need a GPU); kept in sync by the comparison below.
#include "cutlass/util/host_reorder.h"

template <class ElementRaw>
void dump_sm90(const char* name, int M, int K) {
  using ElementAMma = cute::sparse_elem<2, ElementRaw>;
  using ElementEMma = cute::sparse_elem<8, uint8_t>;
  using Config = cutlass::Sm90GemmSparseConfig<ElementAMma, GMMA::Major::K, ElementEMma, Int<128>>;
  auto problem = make_tuple(M, 64, K, 1);
  auto layout_e = Config::fill_layoutE(problem);
  std::vector<uint8_t> buf(size_t(M) * K);  // generous
  auto t_sparse = make_tensor(make_gmem_ptr(recast_ptr<ElementEMma>(buf.data())), layout_e);
  auto t = recast<uint8_t>(t_sparse);
  std::printf("%s %d %d", name, M, K);
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < K / 8; ++c)
      std::printf(" %ld", long(&t(m, c, 0) - buf.data()));
  std::printf("\n");
}

template <class Word>
void dump_sm80(const char* name, int M, int K) {
  int units_per_word = sizeof(Word) * 8 / 4;  // 4-bit codes, one per group of 4 along K
  int cols = K / 4 / units_per_word;
  std::vector<Word> src(size_t(M) * cols), dst(size_t(M) * cols);
  for (size_t i = 0; i < src.size(); ++i) src[i] = Word(i);
  cutlass::TensorRef<Word, cutlass::layout::RowMajor> src_ref(src.data(), cutlass::layout::RowMajor(cols));
  cutlass::TensorRef<Word, cutlass::layout::ColumnMajorInterleaved<2>> dst_ref(
      dst.data(), cutlass::layout::ColumnMajorInterleaved<2>::packed({M, cols}));
  cutlass::reorder_meta(dst_ref, src_ref, {M, 0, cols});
  std::vector<long> where(src.size());
  for (size_t j = 0; j < dst.size(); ++j) where[size_t(dst[j])] = long(j);
  std::printf("%s %d %d", name, M, K);
  for (long w : where) std::printf(" %ld", w);
  std::printf("\n");
}

int main() {
  dump_sm90<cutlass::bfloat16_t>("sm90_16bit", 128, 256);
  dump_sm90<int8_t>("sm90_8bit", 128, 256);
  dump_sm80<uint16_t>("sm80_16bit", 64, 256);
  dump_sm80<uint32_t>("sm80_8bit", 64, 512);
  return 0;
}

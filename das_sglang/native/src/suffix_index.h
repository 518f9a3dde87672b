#pragma once
#include <cstdint>
namespace das {
class SuffixIndex {
 public:
  explicit SuffixIndex(int max_depth) : max_depth_(max_depth) {}
  int max_depth() const { return max_depth_; }
 private:
  int max_depth_;
};
}  // namespace das

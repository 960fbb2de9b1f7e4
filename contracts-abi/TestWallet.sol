// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

/// @title TestWallet: a minimal ERC-1271 smart-contract wallet, for tests only.
/// @notice One owner key. The wallet's signature over a digest is the owner's 65-byte ECDSA
///         signature of that digest, as Coinbase Smart Wallet and most ERC-1271 wallets check
///         an owner's signature.
contract TestWallet {
    bytes4 private constant MAGIC = 0x1626ba7e;
    address public immutable owner;

    constructor(address owner_) {
        owner = owner_;
    }

    function isValidSignature(bytes32 digest, bytes calldata signature) external view returns (bytes4) {
        if (signature.length != 65) return 0xffffffff;
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        address signer = ecrecover(digest, v, r, s);
        return signer != address(0) && signer == owner ? MAGIC : bytes4(0xffffffff);
    }
}

/// @title TestWalletFactory: deploys TestWallets at CREATE2 addresses known in advance, so a
///        wallet can receive USDC and sign (ERC-6492) before it exists.
contract TestWalletFactory {
    event Deployed(address indexed wallet, address indexed owner);

    /// Deploys the owner's wallet for `salt`, or returns it when it exists already.
    function deploy(address owner, bytes32 salt) external returns (address wallet) {
        wallet = predict(owner, salt);
        if (wallet.code.length > 0) return wallet;
        wallet = address(new TestWallet{salt: salt}(owner));
        emit Deployed(wallet, owner);
    }

    function predict(address owner, bytes32 salt) public view returns (address) {
        bytes32 init = keccak256(abi.encodePacked(type(TestWallet).creationCode, abi.encode(owner)));
        return address(uint160(uint256(keccak256(abi.encodePacked(bytes1(0xff), address(this), salt, init)))));
    }
}
